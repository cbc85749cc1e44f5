-- POST /v1/embeddings for wrk, every request with texts no earlier request had.
--
--   wrk -t1 -c32 -d10s --latency -s bench/wrk_embeddings.lua URL -- TEXTS_FILE PER_REQUEST
--
-- TEXTS_FILE holds one text a line, already escaped as the inside of a JSON
-- string; each request takes the next PER_REQUEST of them (a bare string for
-- 1, a list otherwise). Past the file's end the texts come round again with
-- " (k)" appended, k the round, so no text repeats within a run. Run it with
-- one wrk thread (-t1): the counter is per thread. done() prints one line,
-- "wrk-result {json}", with requests, seconds, p50 and p99 in ms and errors.

local texts = {}
local per_request = 1
local counter = 0

function init(args)
  for line in io.lines(args[1]) do
    texts[#texts + 1] = line
  end
  per_request = tonumber(args[2]) or 1
end

local function next_text()
  local round = math.floor(counter / #texts)
  local text = texts[(counter % #texts) + 1]
  counter = counter + 1
  if round > 0 then
    text = text .. " (" .. round .. ")"
  end
  return '"' .. text .. '"'
end

function request()
  local input
  if per_request == 1 then
    input = next_text()
  else
    local parts = {}
    for i = 1, per_request do
      parts[i] = next_text()
    end
    input = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    '{"input":' .. input .. '}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'wrk-result {"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, ' ..
    '"errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, e.connect + e.read + e.write + e.status + e.timeout))
end
