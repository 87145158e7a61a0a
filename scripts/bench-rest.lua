-- wrk script for scripts/bench-rest: sends every request with the Private-Token header
-- (from BENCH_TOKEN) and, when the run is over, prints one machine-readable line with the
-- exact figures from wrk's own latency histogram (wrk's text report rounds them).
--
--   BENCH_TOKEN=glpat-... wrk -t1 -c16 -d10s --latency -s scripts/bench-rest.lua URL

local token = os.getenv("BENCH_TOKEN")
if token ~= nil and token ~= "" then
   wrk.headers["Private-Token"] = token
end

function done(summary, latency, requests)
   local seconds = summary.duration / 1e6 -- summary.duration is in microseconds
   local e = summary.errors
   io.write(string.format(
      "bench-rest-result requests=%d seconds=%.3f rps=%.1f p50_us=%d p90_us=%d p99_us=%d " ..
      "max_us=%d mean_us=%.1f non2xx3xx=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, e.status, e.connect, e.read, e.write, e.timeout))
end
