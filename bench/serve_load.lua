-- wrk script for bench/serve_load.py: POST /v1/predict?top_k=1, one real image per request as a
-- multipart upload, cycling through the images listed in LIST_FILE.
--   wrk -t1 -cN -dS -s bench/serve_load.lua URL -- LIST_FILE THINK_MS
-- THINK_MS 0: closed loop (each connection sends its next request as soon as it has an answer).
-- THINK_MS > 0: each connection waits an exponential time of that mean before each request, so N
-- connections approximate Poisson arrivals at N / THINK_MS per ms while answers are short next to
-- THINK_MS (wrk has no fixed-rate mode and wrk2 is not in Debian). wrk sends every connection's
-- first request at once, with no delay; that burst is not Poisson, so with THINK_MS > 0 the first
-- WARMUP requests (give the connection count) are GET /healthz instead, and the latency
-- percentiles are taken over the predict requests only (healthz answers are far faster than any
-- predict, so they are the WARMUP lowest latencies).
-- done() prints one line "IMAGEREC {json}" with the counts and latency percentiles in microseconds.

local boundary = "imagerec-bench-7f3a9c"
local bodies = {}
local think_ms = 0
local warmup = 0
local n = 0
local sent = 0

function init(args)
  think_ms = tonumber(args[2]) or 0
  warmup = tonumber(args[3]) or 0
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
  sent = sent + 1
  if sent <= warmup then
    return wrk.format("GET", "/healthz")
  end
  n = n % #bodies + 1
  return wrk.format("POST", "/v1/predict?top_k=1",
    { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }, bodies[n])
end

-- Think times are capped at 4 s: uvicorn closes a connection idle for 5 s (its keep-alive
-- timeout), which wrk would count as a read error.
function delay()
  if think_ms <= 0 then
    return 0
  end
  return math.min(-math.log(1 - math.random()) * think_ms, 4000)
end

-- The latency percentile q of the predict requests, the `warmup` fastest answers left out.
local function predict_percentile(latency, total, q)
  local k = total - warmup
  if k <= 0 then
    return 0
  end
  return latency:percentile(100 * (warmup + q / 100 * k) / total)
end

function done(summary, latency, requests)
  local e = summary.errors
  local total = summary.requests
  io.write(string.format(
    'IMAGEREC {"requests": %d, "healthz": %d, "duration_us": %d, "errors": %d, "status_errors": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    total - math.min(warmup, total), math.min(warmup, total), summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, e.status, e.connect, e.read, e.write, e.timeout,
    predict_percentile(latency, total, 50), predict_percentile(latency, total, 99), latency.max))
end
