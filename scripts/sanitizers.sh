#!/usr/bin/env bash
# The sanitizer runs of .ci/run, with clang:
#   tests   AddressSanitizer and UndefinedBehaviorSanitizer (build-sanitize,
#           every library instrumented): the tests of the server, the
#           batcher, the thread team, the workers, the loaders, the router
#           and dispatch, the client, the quantized kernels and the golden
#           fixtures on every CPU path (SANITIZED_TESTS);
#   fuzz    each fuzz target (fuzz/, the same build with libFuzzer's
#           coverage) on its seed corpus, FUZZ_SECONDS each (default 20); a
#           crash's input is kept under build-sanitize/crashes/;
#   thread  ThreadSanitizer (build-tsan): the thread team, the batcher, the
#           layer runner and routing (THREAD_TESTS). Abseil's mutexes are
#           rebuilt from Debian's source of the installed release so that
#           ThreadSanitizer sees them. The gRPC server and the workers are
#           not in it: Debian's gRPC is not instrumented, and its own
#           synchronisation would read as races; they run under
#           AddressSanitizer above.
#   scripts/sanitizers.sh [tests|fuzz|thread|all]   (default all)
#   FUZZ_SECONDS=3600 scripts/sanitizers.sh fuzz     # a long fuzzing run
# Any finding fails the run (-fno-sanitize-recover, halt_on_error).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
build="${SANITIZE_BUILD_DIR:-build-sanitize}"
SANITIZED_TESTS=(thread_team_test router_test dispatch_test layer_executor_test moe_model_test bad_files_test
  batch_queue_test batch_scheduler_test model_registry_test server_test remote_experts_test client_test
  quantized_test golden_test)
THREAD_TESTS=(thread_team_test moe_model_test router_test dispatch_test batch_queue_test
  batch_scheduler_test)
# The sanitizers' allocators report an allocation they cannot make instead
# of throwing std::bad_alloc, which the tests of refused memory expect.
NOT_UNDER_SANITIZERS='-*MemoryCannotBeHad*'
FUZZERS=(fuzz_safetensors fuzz_hf_config fuzz_model_config fuzz_infer_request fuzz_worker_request fuzz_npy)

# clang with its sanitizer and fuzzer runtimes (Debian: clang, libclang-rt-dev).
if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends clang libclang-rt-14-dev >/dev/null
fi

# Abseil's source, the release Debian installed, into $1/abseil-source.
fetch_abseil_source() {
  local into="$1/abseil-source" version lists
  [ -f "$into/absl/synchronization/mutex.cc" ] && return 0
  version=$(dpkg-query -W -f='${Version}' libabsl-dev)
  lists=$(mktemp -d)
  mkdir -p "$lists/parts" "$lists/state/partial" "$lists/download"
  # Debian's own package sources, for source packages.
  for list in /etc/apt/sources.list.d/*.sources; do
    [ -f "$list" ] && sed 's/^Types: deb$/Types: deb-src/' "$list" >"$lists/parts/$(basename "$list")"
  done
  [ -f /etc/apt/sources.list ] && sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >"$lists/parts/main.list"
  local apt=(apt-get -q -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$lists/parts"
    -o Dir::State::Lists="$lists/state" -o APT::Sandbox::User=root)
  "${apt[@]}" update >/dev/null
  (cd "$lists/download" && "${apt[@]}" source --download-only "abseil=$version" >/dev/null 2>&1)
  mkdir -p "$into"
  tar xzf "$lists"/download/abseil_*.orig.tar.gz -C "$into" --strip-components=1
  rm -rf "$lists"
}

common=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DMOE_CUDA=OFF)
targets=()
[ "$what" = all ] || [ "$what" = tests ] && targets+=("${SANITIZED_TESTS[@]}")
[ "$what" = all ] || [ "$what" = fuzz ] && targets+=("${FUZZERS[@]}")
if ((${#targets[@]})); then
  cmake -S . -B "$build" "${common[@]}" -DMOE_SANITIZE=address,undefined -DMOE_FUZZ=ON >/dev/null
  cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
fi

export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp:print_suppressions=0"
failed=0
# run LOG COMMAND...: runs a test binary, says whether it was clean.
run() {
  local log="$1" start=$SECONDS
  shift
  if "$@" >"$log" 2>&1; then
    echo "sanitizers: $(basename "$1") clean ($((SECONDS - start)) s)"
  else
    echo "sanitizers: $(basename "$1") FAILED; the end of $log:"
    tail -40 "$log"
    failed=1
  fi
}
if [ "$what" = all ] || [ "$what" = tests ]; then
  for test in "${SANITIZED_TESTS[@]}"; do
    run "$build/$test.log" "$build/tests/$test" --gtest_brief=1 --gtest_filter="$NOT_UNDER_SANITIZERS"
  done
fi
if [ "$what" = all ] || [ "$what" = fuzz ]; then
  mkdir -p "$build/crashes"
  for fuzzer in "${FUZZERS[@]}"; do
    corpus="$build/corpus/$fuzzer"
    mkdir -p "$corpus"
    if "$build/fuzz/$fuzzer" -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 \
      -artifact_prefix="$build/crashes/$fuzzer-" "$corpus" "fuzz/corpus/$fuzzer" >"$build/$fuzzer.log" 2>&1; then
      echo "sanitizers: $fuzzer clean, $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$build/$fuzzer.log" | grep -o '[0-9]*$') inputs"
    else
      echo "sanitizers: $fuzzer FOUND A CRASH; the end of $build/$fuzzer.log:"
      tail -40 "$build/$fuzzer.log"
      failed=1
    fi
  done
fi
if [ "$what" = all ] || [ "$what" = thread ]; then
  tsan="${TSAN_BUILD_DIR:-build-tsan}"
  mkdir -p "$tsan"
  fetch_abseil_source "$tsan"
  cmake -S . -B "$tsan" "${common[@]}" -DMOE_SANITIZE=thread \
    -DMOE_TSAN_ABSL_SOURCE="$(cd "$tsan/abseil-source" && pwd)" >/dev/null
  cmake --build "$tsan" -j"$(nproc)" --target "${THREAD_TESTS[@]}"
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$PWD/tests/sanitizers/tsan.supp"
  for test in "${THREAD_TESTS[@]}"; do
    run "$tsan/$test.log" "$tsan/tests/$test" --gtest_brief=1 --gtest_filter="$NOT_UNDER_SANITIZERS"
  done
fi
exit "$failed"
