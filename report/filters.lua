-- Pandoc Lua filter for the report, run by Quarto (_quarto.yml `filters:`) and the fallback renderer alike.
--   ::: {.details summary="..."}   long material (sample completions, provenance): collapsed in HTML
--                                  (<details>), shown in full elsewhere.
--   ::: {.profile-note}            the box at the top saying what a profile can show: a shaded box in typst
--                                  (styled by fallback.css in the fallback HTML; Quarto HTML keeps the div).

local function typst(text) return pandoc.RawBlock("typst", text) end

function Div(div)
  if div.classes:includes("details") and FORMAT:match("html") then
    local summary = div.attributes["summary"] or "Details"
    local blocks = {pandoc.RawBlock("html", "<details><summary>" .. summary .. "</summary>")}
    for _, block in ipairs(div.content) do table.insert(blocks, block) end
    table.insert(blocks, pandoc.RawBlock("html", "</details>"))
    return blocks
  end
  if div.classes:includes("details") then
    return div.content
  end
  if div.classes:includes("profile-note") and FORMAT:match("typst") then
    local blocks = {typst("#block(fill: luma(235), inset: 8pt, radius: 3pt, width: 100%)[")}
    for _, block in ipairs(div.content) do table.insert(blocks, block) end
    table.insert(blocks, typst("]"))
    return blocks
  end
end
