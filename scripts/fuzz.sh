#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: request target and query rules, token parsers,
# configuration) for a bounded time each, starting from the committed corpus (fuzz/corpus).
#
#   scripts/fuzz.sh          # 30 s per target (CI, through scripts/test.sh)
#   scripts/fuzz.sh 600      # a long run: 10 min per target (figures of the last one: README)
#
# Needs the nightly toolchain (libFuzzer instrumentation) and cargo-fuzz; installs both when
# missing. A crash fails the run and leaves its input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
cd fuzz
echo "== fuzz: building the targets (nightly, sanitizers)"
cargo +nightly fuzz build --release
for target in request_target tokens config; do
  echo "== fuzz: $target for ${secs}s"
  # New inputs go to a scratch corpus; the committed one is only read.
  scratch=$(mktemp -d)
  rc=0
  cargo +nightly fuzz run --release "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$secs" -max_len=8192 -timeout=10 -print_final_stats=1 >"$scratch.log" 2>&1 || rc=$?
  grep -E '^(Done|stat::number_of_executed_units|SUMMARY)|panicked' "$scratch.log" || true
  if [ "$rc" != 0 ]; then
    tail -40 "$scratch.log" >&2
    echo "fuzz: $target failed (its input is under fuzz/artifacts/$target)" >&2
    exit 1
  fi
  rm -rf "$scratch" "$scratch.log"
done
