"""The four experiments of the paper, one file each: settings, units, `run(profile)`."""
