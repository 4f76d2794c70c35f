-- wrk script for bench/benchmark.py: POST one outbound message as RapidPro
-- does, count the answers that are not 201 and print the counts at the end
-- (one line, parsed by benchmark.py).

wrk.method = "POST"
wrk.body = '{"to": "+27820000001", "from": "8110", "content": "hello"}'
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  created = 0
  other = 0
  last_other = 0
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  else
    other = other + 1
    last_other = status
  end
end

function done(summary, latency, requests)
  local total_created, total_other, last = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_created = total_created + thread:get("created")
    total_other = total_other + thread:get("other")
    if thread:get("last_other") ~= 0 then
      last = thread:get("last_other")
    end
  end
  io.write(string.format("wrk-lua: status201=%d non201=%d last_non201=%d\n",
    total_created, total_other, last))
end
