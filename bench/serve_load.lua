-- wrk script for bench/serve_load.py: POST /v1/predict?top_k=1, one real image per request as a
-- multipart upload, cycling through the images listed in LIST_FILE.
--   wrk -t1 -cN -dS -s bench/serve_load.lua URL -- LIST_FILE
-- A closed loop: each connection sends its next request as soon as it has an answer. (The half
-- load and batch-1 phases use serve_load.py's own open-loop client: until session 12 the half load
-- came from this script with exponential think times and a GET /healthz first on each connection,
-- meant to be left out of the percentiles; but wrk runs done() in a Lua state of its own where
-- init() never ran, so the healthz answers were counted.)
-- done() prints one line "IMAGEREC {json}" with the counts and latency percentiles in microseconds.

local boundary = "imagerec-bench-7f3a9c"
local bodies = {}
local n = 0

function init(args)
  for path in io.lines(args[1]) do
    local f = assert(io.open(path, "rb"))
    local data = f:read("*a")
    f:close()
    bodies[#bodies + 1] = "--" .. boundary .. "\r\n"
      .. "Content-Disposition: form-data; name=\"file\"; filename=\"image\"\r\n"
      .. "Content-Type: application/octet-stream\r\n\r\n"
      .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
  n = math.random(#bodies)
end

function request()
  n = n % #bodies + 1
  return wrk.format("POST", "/v1/predict?top_k=1",
    { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }, bodies[n])
end

function done(summary, latency, requests)
  local e = summary.errors
  local total = summary.requests
  io.write(string.format(
    'IMAGEREC {"requests": %d, "duration_us": %d, "errors": %d, "status_errors": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    total, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
