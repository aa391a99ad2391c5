#!/usr/bin/env bash
# Gateway load figures (issue 4): the same streamed chat completions sent by bench/gateway_load
# straight to the test upstream and through `gpustream serve` + `gpustream provider` to it, at
# 1, 64 and 256 concurrent streams, then the RSS of `serve` with 5,000 idle streams open. Each
# gateway run also shows where its first tokens waited: `serve`'s own histograms (from the request,
# and from the offer to the provider, to the first token; and the agent's own time from the offer
# to its backend's first token, as its done frames report it), and the CPU each process used.
# Builds nothing: run ./scripts/build first.
#
#   bench/gateway_load.sh [BUILD_DIR]        (default: build)
#
# Settings (environment): DURATION_S (10) measured seconds per run after WARMUP_S (2);
# CONCURRENCIES ("1 64 256"; empty: none); TOKENS (64) per answer; TOKEN_INTERVAL_US (1500) between
# the upstream's tokens, about 670 tokens/s per stream: the platform suspends a provider whose jobs
# run faster than 1,000 tokens/s per stream (domain/scoring.hpp, plausible_tokens_per_second_max),
# so 0 (as fast as possible) gets the benchmark's provider suspended for 24 h after a few jobs;
# DECODE_STEPS (1: the upstream sends every answer's later tokens at the ticks of one shared clock,
# as LM Studio, Ollama, llama.cpp server and vLLM do, decoding their concurrent answers as one batch
# with one token per answer per step; 0: each answer on its own pace from its start, which costs the
# upstream a timer per token and spreads its writes, and was the only mode before 2026-12-04);
# IDLE_STREAMS (5000; 0: skip); HOLD_S (10) seconds the idle streams stay open; GENERATOR_THREADS
# (1); DURABILITY (sync; buffered shows what the fsyncs cost); PRICE_PER_MTOK (1000000 micro-USD per
# million tokens, so that every completion is billed in the ledger as in production; 0: free);
# SERVE_ARGS: more flags for `gpustream serve` (e.g. "--http-threads 1"); REPEAT (1): runs per
# concurrency (direct, then gateway, each time). The goals are judged on the median over the runs:
# on a shared 2-core machine one run's figures move by 10-20 %. TRACE_S (0: off): during each
# gateway run, every TRACE_S seconds, the jobs `serve` has ended so far (its /metrics), the rate
# since the last line and `serve`'s VmRSS; with a long DURATION_S this shows whether the rate holds
# and how memory grows with the jobs done (e.g. DURATION_S=150 TRACE_S=10 CONCURRENCIES=256).
# FLOOR (0; 1: after each gateway run, a third run through two bare TCP relays chained in front of
# the same upstream, bench/relay_floor: what any two extra processes on the way cost on these cores
# before any gateway work; its figures are printed, not judged).
# Logs stay in the temporary folder it names when something fails (or always, with KEEP_LOGS=1).
set -euo pipefail

build=$(cd "${1:-build}" && pwd)
duration_s=${DURATION_S:-10}
warmup_s=${WARMUP_S:-2}
concurrencies=${CONCURRENCIES-1 64 256}
tokens=${TOKENS:-64}
token_interval_us=${TOKEN_INTERVAL_US:-1500}
decode_steps=${DECODE_STEPS:-1}
[[ "$decode_steps" =~ ^[01]$ ]] || { echo "error: DECODE_STEPS must be 0 or 1, not '$decode_steps'" >&2; exit 2; }
decode_flag= decode_note=
if [ "$decode_steps" = 1 ]; then decode_flag=--decode-steps decode_note=' on a shared decode clock'; fi
idle_streams=${IDLE_STREAMS:-5000}
hold_s=${HOLD_S:-10}
generator_threads=${GENERATOR_THREADS:-1}
durability=${DURABILITY:-sync}
price_per_mtok=${PRICE_PER_MTOK:-1000000}
repeat=${REPEAT:-1}
floor=${FLOOR:-0}
[[ "$floor" =~ ^[01]$ ]] || { echo "error: FLOOR must be 0 or 1, not '$floor'" >&2; exit 2; }
trace_s=${TRACE_S:-0}
[[ "$trace_s" =~ ^[0-9]+$ ]] || { echo "error: TRACE_S must be a whole number of seconds, not '$trace_s'" >&2; exit 2; }
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || { echo "error: REPEAT must be a whole number >= 1, not '$repeat'" >&2; exit 2; }
# The idle upstream's first token comes at once (a stream's head goes out with it) and its second
# long after the hold ends, so its streams stay open and idle.
idle_token_interval_us=600000000

gpustream=$build/app/gpustream
upstream_bin=$build/tests/upstream/gpustream_test_upstream
generator=$build/bench/gateway_load
relay_bin=$build/bench/relay_floor
for binary in "$gpustream" "$upstream_bin" "$generator" "$relay_bin"; do
  [ -x "$binary" ] || { echo "error: $binary is missing; build first (./scripts/build)" >&2; exit 2; }
done

# Every process holds one descriptor per stream (the generator, serve, the agent, the upstream);
# serve keeps 1,024 of its files for the event store, and its connections include the agents'
# links (one per 256 idle streams, and the bench's own).
files_needed=$((idle_streams + 1024 + 64))
if ! ulimit -n "$files_needed" 2>/dev/null; then
  echo "error: cannot raise the open-files limit to $files_needed for $idle_streams idle streams" \
       "(soft $(ulimit -Sn), hard $(ulimit -Hn)); raise the hard limit or set IDLE_STREAMS lower" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gpustream-gateway-load.XXXXXX")
pids=()   # every process started here, and its name for messages
names=()
ok=0
track() {  # track PID NAME
  pids+=("$1")
  names+=("$2")
}
alive() {  # alive PID: the process exists and is not a zombie
  local state
  state=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}
# Stops every process started here: SIGTERM, up to 10 s to exit, then SIGKILL. A process that
# ignores SIGTERM or dies of something else on the way out is a bug worth seeing: said out loud.
cleanup() {
  local n pid i status
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for n in "${!pids[@]}"; do
    pid=${pids[n]}
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      echo "warning: ${names[n]} (pid $pid) did not exit within 10 s of SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      continue
    fi
    status=0
    wait "$pid" 2>/dev/null || status=$?
    if [ "$status" != 0 ] && [ "$status" != 143 ]; then
      echo "warning: ${names[n]} (pid $pid) exited with status $status after SIGTERM" >&2
    fi
  done
  if [ "$ok" = 1 ] && [ -z "${KEEP_LOGS:-}" ]; then
    rm -rf "$work"
  else
    echo "logs kept in $work" >&2
  fi
}
trap cleanup EXIT

fail() {
  echo "error: $*" >&2
  exit 1
}

# wait_for_line FILE REGEX SECONDS PID: polls FILE until a line matches, the process ends, or time is up.
wait_for_line() {
  local file=$1 pattern=$2 seconds=$3 pid=$4 i
  for ((i = 0; i < seconds * 10; i++)); do
    grep -qE "$pattern" "$file" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$file" >&2; fail "process $pid ended before printing /$pattern/"; }
    sleep 0.1
  done
  tail -n 20 "$file" >&2
  fail "no /$pattern/ in $file within $seconds s"
}

# start_upstream NAME MODEL FIRST_TOKEN_MS [TOKEN_INTERVAL_US]: starts a test upstream, sets
# upstream_port.
start_upstream() {
  local name=$1 model=$2 first_token_ms=$3 interval_us=${4:-$token_interval_us}
  "$upstream_bin" --listen 127.0.0.1:0 --models "$model" --tokens "$tokens" \
    --first-token-ms "$first_token_ms" --token-interval-us "$interval_us" \
    ${decode_flag:+"$decode_flag"} \
    > "$work/$name.out" 2> "$work/$name.err" &
  upstream_pid=$!
  track "$upstream_pid" "test upstream $name"
  wait_for_line "$work/$name.out" '^listening ' 10 "$upstream_pid"
  upstream_port=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$work/$name.out")
}

# admin PATH JSON: POST to the admin API, prints the answer; fails on a non-2xx status.
admin() {
  curl -sS --fail-with-body -H "Authorization: Bearer $admin_token" -H 'Content-Type: application/json' \
    -d "$2" "http://127.0.0.1:$serve_port$1" || fail "POST $1 $2 failed"
}

json_string() {  # json_string FIELD: the string value of FIELD in the JSON object on stdin
  sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"
}

# start_provider NAME UPSTREAM_PORT MAX_CONCURRENCY: creates a provider and starts its agent.
# --no-probe: the agent admits exactly MAX_CONCURRENCY jobs, so every run sees the same node. Its
# probe would measure the test upstream sharing these cores with everything else and advertise
# whatever it found, and for the idle upstream would get no answer within any level.
start_provider() {
  local name=$1 port=$2 concurrency=$3 answer token
  answer=$(admin /admin/providers "{\"name\":\"$name\"}")
  token=$(json_string token <<< "$answer")
  [ -n "$token" ] || fail "POST /admin/providers answered without a token: $answer"
  GPUSTREAM_PROVIDER_TOKEN=$token "$gpustream" provider --coordinator "ws://127.0.0.1:$serve_port" \
    --backend "openai=http://127.0.0.1:$port/v1" --name "$name" --max-concurrency "$concurrency" --no-probe --price-per-mtok "$price_per_mtok" \
    > "$work/$name.out" 2> "$work/$name.log" &
  provider_pid=$!
  track "$provider_pid" "gpustream provider $name"
}

# wait_for_model MODEL PID: until GET /v1/models through the gateway lists MODEL.
wait_for_model() {
  local model=$1 pid=$2 i
  for ((i = 0; i < 300; i++)); do
    curl -sS -H "Authorization: Bearer $api_key" "http://127.0.0.1:$serve_port/v1/models" 2>/dev/null |
      grep -q "\"id\":\"$model\"" && return 0
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$work"/*.log >&2; fail "the provider agent for $model ended"; }
    sleep 0.1
  done
  tail -n 20 "$work"/*.log >&2
  fail "GET /v1/models did not list $model within 30 s"
}

cpu_ticks() {  # cpu_ticks PID: user + system CPU time the process has used, in clock ticks
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}
clock_ticks=$(getconf CLK_TCK)

field() {  # field NAME LINE: the value of NAME=… in a RESULT line
  sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$2"
}

# load NAME URL KEY CONCURRENCY: runs the generator, prints its RESULT line; fails on any error.
load() {
  local name=$1 url=$2 key=$3 concurrency=$4 log=$work/load-$1-$4.txt
  if ! "$generator" --url "$url" ${key:+--key "$key"} --concurrency "$concurrency" --duration-s "$duration_s" \
      --warmup-s "$warmup_s" --tokens "$tokens" --model bench-model --threads "$generator_threads" > "$log" 2>&1; then
    cat "$log" >&2
    fail "the $name run at concurrency $concurrency had errors (above); the figures do not count"
  fi
  sed 's/^/    /' "$log" >&2
  grep '^RESULT ' "$log"
}

echo "gateway load: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start; $durability durability;" \
     "$tokens tokens per answer, token interval ${token_interval_us} us$decode_note, ${duration_s} s per run after ${warmup_s} s warm-up"

start_upstream upstream bench-model 0
direct_port=$upstream_port
direct_pid=$upstream_pid

# start_relay NAME TARGET_PORT: starts a bare relay to TARGET_PORT, sets relay_port and relay_pid.
start_relay() {
  "$relay_bin" --listen 0 --to "$2" > "$work/$1.out" 2> "$work/$1.err" &
  relay_pid=$!
  track "$relay_pid" "$1"
  wait_for_line "$work/$1.out" '^listening ' 10 "$relay_pid"
  relay_port=$(sed -n 's/^listening .*:\([0-9]*\)$/\1/p' "$work/$1.out")
}
if [ "$floor" = 1 ]; then  # client -> relay A ("serve") -> relay B ("the agent") -> upstream
  start_relay relay-b "$direct_port"
  relay_b_pid=$relay_pid
  start_relay relay-a "$relay_port"
  relay_a_pid=$relay_pid floor_port=$relay_port
fi

admin_token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
GPUSTREAM_ADMIN_TOKEN=$admin_token "$gpustream" serve --data "$work/data" --http 127.0.0.1:0 --durability "$durability" \
  --rate-per-minute 100000000 --rate-burst 1000000 ${SERVE_ARGS:-} > "$work/serve.out" 2> "$work/serve.log" &
serve_pid=$!
track "$serve_pid" "gpustream serve"
wait_for_line "$work/serve.log" 'listening http=' 30 "$serve_pid"
serve_port=$(sed -n 's/.*listening http=[^ ]*:\([0-9]*\) .*/\1/p' "$work/serve.log" | head -n 1)
[ -n "$serve_port" ] || fail "no port in serve's 'listening' line: $(grep 'listening http=' "$work/serve.log")"

user=$(admin /admin/users '{"tier":"premium","credit_micros":100000000000}')
api_key=$(json_string api_key <<< "$user")
[ -n "$api_key" ] || fail "POST /admin/users answered without an api_key: $user"

start_provider bench-provider "$direct_port" 256
agent_pid=$provider_pid
wait_for_model bench-model "$agent_pid"

# trace_serve: every trace_s seconds until killed, one line on stderr: seconds since it started,
# jobs ended in `serve` (all statuses, from /metrics), their rate since the previous line, VmRSS.
trace_serve() {
  local start=$SECONDS last_jobs=0 last_t=0 jobs rss t
  while sleep "$trace_s"; do
    jobs=$(curl -sS "http://127.0.0.1:$serve_port/metrics" | awk '/^gpustream_jobs_ended_total/ { n += $2 } END { print n + 0 }')
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$serve_pid/status")
    t=$((SECONDS - start))
    awk -v t="$t" -v j="$jobs" -v lj="$last_jobs" -v lt="$last_t" -v rss="$rss" 'BEGIN {
      printf "    trace: t=%d s jobs_ended=%d rate=%.0f/s serve_rss=%d KiB\n", t, j, (t > lt ? (j - lj) / (t - lt) : 0), rss }' >&2
    last_jobs=$jobs last_t=$t
  done
}

# scrape: `serve`'s /metrics text.
scrape() {
  curl -sS "http://127.0.0.1:$serve_port/metrics"
}

# histograms: from a scrape on stdin, `serve`'s time-to-first-token, offer-to-first-token and
# provider-reported time-to-first-token bucket counts, one "NAME LE COUNT" line per bucket.
histograms() {
  sed -n 's/^gpustream_\(time_to_first_token\|offer_to_first_token\|provider_ttft\)_seconds_bucket{le="\([^"]*\)"} \([0-9]*\)$/\1 \2 \3/p'
}

# store_counts: from a scrape on stdin, the event store's counters, "groups appends syncs".
store_counts() {
  awk '/^gpustream_store_groups_total / { g = $2 } /^gpustream_store_appends_total / { a = $2 }
       /^gpustream_store_syncs_total / { s = $2 } END { print g + 0, a + 0, s + 0 }'
}

# split_line BEFORE AFTER: the p50 and p90 of each histogram over the jobs between two scrapes,
# interpolated within buckets as Prometheus' histogram_quantile does.
split_line() {
  awk 'NR == FNR { before[$1 " " $2] = $3; next }
    { name[++n] = $1; le[n] = $2; count[n] = $3 - before[$1 " " $2] }
    function quantile(which, q,   i, total, rank, lower, below) {
      for (i = 1; i <= n; i++) if (name[i] == which && le[i] == "+Inf") total = count[i]
      if (total == 0) return -1
      rank = q * total; lower = 0; below = 0
      for (i = 1; i <= n; i++) {
        if (name[i] != which) continue
        if (le[i] == "+Inf") return lower * 1000
        if (count[i] >= rank) return (lower + (le[i] - lower) * (rank - below) / (count[i] - below)) * 1000
        lower = le[i]; below = count[i]
      }
    }
    END {
      printf "       serve'"'"'s own histograms: request to first token p50 %.2f ms, p90 %.2f ms | offer to first token",
             quantile("time_to_first_token", 0.5), quantile("time_to_first_token", 0.9)
      printf " (the provider'"'"'s round trip) p50 %.2f ms, p90 %.2f ms", quantile("offer_to_first_token", 0.5),
             quantile("offer_to_first_token", 0.9)
      printf " | the agent'"'"'s own (offer received to its backend'"'"'s first token) p50 %.2f ms, p90 %.2f ms",
             quantile("provider_ttft", 0.5), quantile("provider_ttft", 0.9)
    }' <(printf '%s\n' "$1") <(printf '%s\n' "$2")
}

# measure_concurrency C: one direct and one gateway run at C streams; appends their lines to summary.
measure_concurrency() {
  local c=$1 direct gateway direct_upstream_ticks serve_before agent_before upstream_before
  local serve_lines_before agent_lines_before cost line
  echo "concurrency $c: direct" >&2
  upstream_before=$(cpu_ticks "$direct_pid")
  direct=$(load direct "http://127.0.0.1:$direct_port/v1" "" "$c")
  direct_upstream_ticks=$(($(cpu_ticks "$direct_pid") - upstream_before))
  echo "concurrency $c: through the gateway" >&2
  serve_before=$(cpu_ticks "$serve_pid") agent_before=$(cpu_ticks "$agent_pid") upstream_before=$(cpu_ticks "$direct_pid")
  serve_lines_before=$(wc -l < "$work/serve.log") agent_lines_before=$(wc -l < "$work/bench-provider.log")
  local tracer=
  if [ "$trace_s" -gt 0 ]; then
    trace_serve &
    tracer=$!
  fi
  local metrics_before metrics_after split
  metrics_before=$(scrape)
  gateway=$(load gateway "http://127.0.0.1:$serve_port/v1" "$api_key" "$c")
  metrics_after=$(scrape)
  split=$(split_line "$(histograms <<< "$metrics_before")" "$(histograms <<< "$metrics_after")")
  if [ -n "$tracer" ]; then kill "$tracer" 2>/dev/null || true; wait "$tracer" 2>/dev/null || true; fi
  # Where the cores went: CPU time per completion of each process (warm-up included on both sides).
  cost=$(awk -v hz="$clock_ticks" -v dn="$(field completions "$direct")" -v gn="$(field completions "$gateway")" \
    -v du="$direct_upstream_ticks" -v dg="$(field cpu_s "$direct")" -v gg="$(field cpu_s "$gateway")" \
    -v s="$(($(cpu_ticks "$serve_pid") - serve_before))" -v a="$(($(cpu_ticks "$agent_pid") - agent_before))" \
    -v u="$(($(cpu_ticks "$direct_pid") - upstream_before))" \
    -v sl="$(($(wc -l < "$work/serve.log") - serve_lines_before))" \
    -v al="$(($(wc -l < "$work/bench-provider.log") - agent_lines_before))" \
    -v store="$(store_counts <<< "$metrics_before") $(store_counts <<< "$metrics_after")" 'BEGIN {
      us = 1e6 / hz
      format = "       CPU us per completion: direct: upstream %.0f, generator %.0f | gateway: serve %.0f, agent %.0f,"
      format = format " upstream %.0f, generator %.0f | log lines per completion: serve %.1f, agent %.1f"
      printf format, du * us / dn, dg * 1e6 / dn, s * us / gn, a * us / gn, u * us / gn, gg * 1e6 / gn, sl / gn, al / gn
      split(store, k, " ")  # groups, appends, syncs before; then after
      groups = k[4] - k[1]
      printf " | store: %.1f appends per group, %.1f groups and %.1f fsyncs per completion",
             (groups > 0 ? (k[5] - k[2]) / groups : 0), groups / gn, (k[6] - k[3]) / gn
    }')
  line=$(awk -v c="$c" \
    -v dt50="$(field ttft_p50_us "$direct")" -v dt99="$(field ttft_p99_us "$direct")" \
    -v gt50="$(field ttft_p50_us "$gateway")" -v gt99="$(field ttft_p99_us "$gateway")" \
    -v dl50="$(field total_p50_us "$direct")" -v dl99="$(field total_p99_us "$direct")" \
    -v gl50="$(field total_p50_us "$gateway")" -v gl99="$(field total_p99_us "$gateway")" \
    -v dr="$(field completions_per_s "$direct")" -v gr="$(field completions_per_s "$gateway")" \
    -v dm="$(field measured "$direct")" -v gm="$(field measured "$gateway")" \
    -v durability="$durability" 'BEGIN {
      format = "C=%-4d added TTFT p50 %.2f ms, p99 %.2f ms | added total p50 %.2f ms, p99 %.2f ms"
      format = format " | throughput %.2fx (gateway %.0f/s, direct %.0f/s) | percentiles of gateway %d, direct %d completions"
      printf format, c, (gt50 - dt50) / 1000, (gt99 - dt99) / 1000, (gl50 - dl50) / 1000, (gl99 - dl99) / 1000,
             (dr > 0 ? gr / dr : 0), gr, dr, gm, dm
      if (c == 64 && durability == "sync") printf " | goal at 64 (sync): added TTFT p50 <= 1 ms (%s), p99 <= 5 ms (%s)",
                          (gt50 - dt50 <= 1000 ? "met" : "NOT met"), (gt99 - dt99 <= 5000 ? "met" : "NOT met")
      else if (c == 64) printf " | goal at 64 is for sync durability: not judged"
    }')
  summary+=("$line" "$cost" "$split")
  rates[$c]+=" $(field completions_per_s "$gateway")"
  added_p50_ms[$c]+=" $(awk -v g="$(field ttft_p50_us "$gateway")" -v d="$(field ttft_p50_us "$direct")" 'BEGIN { print (g - d) / 1000 }')"
  added_p99_ms[$c]+=" $(awk -v g="$(field ttft_p99_us "$gateway")" -v d="$(field ttft_p99_us "$direct")" 'BEGIN { print (g - d) / 1000 }')"
  added_total_p50_ms[$c]+=" $(awk -v g="$(field total_p50_us "$gateway")" -v d="$(field total_p50_us "$direct")" 'BEGIN { print (g - d) / 1000 }')"
  added_total_p99_ms[$c]+=" $(awk -v g="$(field total_p99_us "$gateway")" -v d="$(field total_p99_us "$direct")" 'BEGIN { print (g - d) / 1000 }')"
  ratios[$c]+=" $(awk -v g="$(field completions_per_s "$gateway")" -v d="$(field completions_per_s "$direct")" 'BEGIN { print (d > 0 ? g / d : 0) }')"
  echo "$line"
  echo "$cost"
  echo "$split"
  [ "$floor" = 1 ] && measure_floor "$c" "$direct"
  return 0
}

# measure_floor C DIRECT_RESULT: one run at C streams through the two bare relays; prints its line
# (and appends it to summary): TTFT added to the direct run's and the relays' CPU per completion.
measure_floor() {
  local c=$1 direct=$2 relayed a_before b_before u_before line
  echo "concurrency $c: through two bare relays" >&2
  a_before=$(cpu_ticks "$relay_a_pid") b_before=$(cpu_ticks "$relay_b_pid") u_before=$(cpu_ticks "$direct_pid")
  relayed=$(load floor "http://127.0.0.1:$floor_port/v1" "" "$c")
  line=$(awk -v c="$c" -v hz="$clock_ticks" -v n="$(field completions "$relayed")" \
    -v a="$(($(cpu_ticks "$relay_a_pid") - a_before))" -v b="$(($(cpu_ticks "$relay_b_pid") - b_before))" \
    -v u="$(($(cpu_ticks "$direct_pid") - u_before))" -v g="$(field cpu_s "$relayed")" \
    -v dt50="$(field ttft_p50_us "$direct")" -v dt99="$(field ttft_p99_us "$direct")" \
    -v rt50="$(field ttft_p50_us "$relayed")" -v rt99="$(field ttft_p99_us "$relayed")" \
    -v rate="$(field completions_per_s "$relayed")" 'BEGIN {
      us = 1e6 / hz
      printf "C=%-4d floor, two bare relays: added TTFT p50 %.2f ms, p99 %.2f ms | %.0f/s", c,
             (rt50 - dt50) / 1000, (rt99 - dt99) / 1000, rate
      printf " | CPU us per completion: relays %.0f and %.0f, upstream %.0f, generator %.0f",
             a * us / n, b * us / n, u * us / n, g * 1e6 / n
    }')
  summary+=("$line")
  echo "$line"
}

# measure_idle: idle streams through a second upstream whose second token comes after the hold,
# served by agents that together take all of them at once, so every stream is assigned to a
# provider and waiting, none queued. One provider may offer a model for at most 256 concurrent
# jobs (domain/provider.hpp, offer_concurrency_max), so 5,000 streams take 20 agents. Appends its
# line to summary.
measure_idle() {
  local idle_port idle_agents i idle_log idle generator_pid upstream_active active
  local idle_agent_pids=()
  start_upstream idle-upstream idle-model 0 "$idle_token_interval_us"
  idle_port=$upstream_port
  idle_agents=$(((idle_streams + 255) / 256))
  for ((i = 1; i <= idle_agents; i++)); do
    start_provider "idle-provider-$i" "$idle_port" $(((idle_streams + idle_agents - 1) / idle_agents))
    idle_agent_pids+=("$provider_pid")
  done
  wait_for_model idle-model "$provider_pid"
  # The model is listed once one agent is online; wait until every agent's log shows its welcome.
  for ((i = 1; i <= idle_agents; i++)); do
    wait_for_line "$work/idle-provider-$i.log" 'welcome provider_id=' 30 "${idle_agent_pids[i - 1]}"
  done
  echo "idle streams: $idle_streams through the gateway, held $hold_s s" >&2
  idle_log=$work/idle.txt
  "$generator" --url "http://127.0.0.1:$serve_port/v1" --key "$api_key" --model idle-model \
    --idle-streams "$idle_streams" --hold-s "$hold_s" --rss-pid "$serve_pid" > "$idle_log" 2>&1 &
  generator_pid=$!
  # While they are held, the upstream says how many reached it: every stream assigned, none queued.
  wait_for_line "$idle_log" '^idle: .* open after ' 120 "$generator_pid"
  # (The most seen over half the hold: offers may still be on their way when the streams opened.)
  upstream_active=0
  for ((i = 0; i < hold_s * 5; i++)); do
    active=$(curl -sS "http://127.0.0.1:$idle_port/stats" | sed -n 's/.*"active":\([0-9]*\).*/\1/p')
    [ "${active:-0}" -gt "$upstream_active" ] && upstream_active=$active
    [ "$upstream_active" -ge "$idle_streams" ] && break
    sleep 0.1
  done
  if ! wait "$generator_pid"; then
    cat "$idle_log" >&2
    fail "the idle-streams run failed (above)"
  fi
  sed 's/^/    /' "$idle_log" >&2
  idle=$(grep '^IDLE ' "$idle_log")
  summary+=("$(awk -v n="$(field streams "$idle")" -v before="$(field rss_before_kib "$idle")" \
    -v open="$(field rss_open_kib "$idle")" -v held="$(field rss_held_kib "$idle")" \
    -v per="$(field kib_per_stream "$idle")" -v active="$upstream_active" 'BEGIN {
      format = "idle streams %d (%d of them waiting at the upstream): serve VmRSS %d KiB before, %d KiB open,"
      format = format " %d KiB after the hold: %.1f KiB per open idle stream (goal <= 64 KiB: %s)"
      printf format, n, active, before, open, held, per, (per <= 64 ? "met" : "NOT met") }')")
  if [ -n "${concurrencies// /}" ]; then
    # Memory freed after the load runs is reused by the streams: the figure may be too low.
    summary+=("       (measured after the load runs, on serve's grown heap: for the figure, run alone with CONCURRENCIES=\"\")")
  fi
}

median() {  # median VALUES...: the median of the numbers given
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

summary=()
declare -A rates added_p50_ms added_p99_ms added_total_p50_ms added_total_p99_ms ratios  # by concurrency: one value per run
for c in $concurrencies; do
  for ((run = 1; run <= repeat; run++)); do measure_concurrency "$c"; done
done
if [ -n "$concurrencies" ]; then
  best_rate=0
  best_c=0
  for c in $concurrencies; do
    # shellcheck disable=SC2086  # word splitting of the run values is wanted
    rate=$(median ${rates[$c]})
    # shellcheck disable=SC2086
    summary+=("$(awk -v c="$c" -v n="$repeat" -v r="$rate" -v p50="$(median ${added_p50_ms[$c]})" \
      -v p99="$(median ${added_p99_ms[$c]})" -v all="${rates[$c]# }" -v durability="$durability" \
      -v t50="$(median ${added_total_p50_ms[$c]})" -v t99="$(median ${added_total_p99_ms[$c]})" \
      -v ratio="$(median ${ratios[$c]})" 'BEGIN {
        printf "C=%-4d median of %d run(s): gateway %.0f completions/s (runs: %s), added TTFT p50 %.2f ms, p99 %.2f ms", c, n, r, all, p50, p99
        if (c == 64 && durability == "sync") printf " (TTFT goal <= 1 ms and <= 5 ms: %s)", (p50 <= 1 && p99 <= 5 ? "met" : "NOT met")
        printf ", added total p50 %.2f ms, p99 %.2f ms, throughput %.2fx the direct run'"'"'s", t50, t99, ratio
      }')")
    if awk -v a="$rate" -v b="$best_rate" 'BEGIN { exit !(a > b) }'; then best_rate=$rate best_c=$c; fi
  done
  summary+=("$(awk -v r="$best_rate" -v c="$best_c" 'BEGIN {
    printf "best median gateway throughput %.0f completions/s, at C=%d (goal >= 1,000 through one node: %s)", r, c, (r >= 1000 ? "met" : "NOT met") }')")
fi
if [ "$idle_streams" -gt 0 ]; then measure_idle; fi

echo
echo "== gateway load, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $durability durability," \
     "token interval $token_interval_us us$decode_note, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end =="
for line in "${summary[@]}"; do echo "$line"; done
ok=1
