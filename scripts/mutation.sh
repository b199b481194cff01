#!/usr/bin/env bash
# Mutation testing of the core modules (mutmut 3.8, forkserver mode), each in a private copy of
# the tree so that runs never collide with each other or with work in progress.
#
# Usage: scripts/mutation.sh [-j N] [--keep DIR] [--timeout S] [--only GLOB] [MODULE ...]
#   MODULE: batcher, arrivals, queue, codec, tensors, policies, estimators, shared_memory, ensemble,
#   response_cache, splits, health, schedule (default: these); router only when named (large:
#   pick functions, e.g. --only 'gateway.routing.router.xǁRouterǁ_probe*'). Not part of the
#   default CI run; a CI job may run it on demand.
#   -j N        mutmut --max-children (default 1: the machines are shared)
#   --keep DIR  work in DIR/<module> and keep it; a later run with the same DIR re-syncs the
#               tree and retests only mutants not yet killed (and changed functions)
#   --timeout S per-test timeout while mutants run (default 30): a mutant whose test it stops
#               counts as a hang (detected, like a kill)
#   --only GLOB run only the mutants whose names match (fnmatch; repeatable), e.g. to confirm
#               that a new test kills them: 'gateway.batching.batcher.xǁBatcherǁ_run__mutmut_11?'
#               (the others count as not run, outside the score)
# Prints module / mutants / killed / hangs / survived / equivalents excluded / score, where
# score = (killed + hangs) / (mutants - equivalents); the surviving mutants' names follow.
# Equivalent mutants are listed in scripts/mutation-equivalents.txt, one per line:
#   <mutmut mutant name>  # <one-line reason>
# Look at one:  cd DIR/<module> && "$VENV"/bin/mutmut show <name>
#
# The gateway tests start servers in a subprocess (tests/conftest.py): they run from the
# mutants/ copy (PYTHONPATH and cwd point there) and inherit MUTANT_UNDER_TEST, so they see the
# mutant; as mutmut cannot see which functions a subprocess calls, each module's server tests
# are run for every one of its mutants (after its in-process tests, which are faster).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
JOBS=1
KEEP=""
TIMEOUT_S=30
ONLY=()
MODULES=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j) JOBS=$2; shift 2 ;;
    --keep) KEEP=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
    --timeout) TIMEOUT_S=$2; shift 2 ;;
    --only) ONLY+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    batcher|arrivals|queue|codec|tensors|policies|estimators|shared_memory|ensemble|response_cache|splits|health|schedule|router)
      MODULES+=("$1"); shift ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#MODULES[@]} -gt 0 ] || MODULES=(batcher arrivals queue codec tensors policies estimators shared_memory
  ensemble response_cache splits health schedule)

# module -> source file; tests run in-process; tests that reach it through a server subprocess
declare -A SRC=(
  [batcher]=gateway/batching/batcher.py
  [arrivals]=gateway/batching/arrivals.py
  [queue]=gateway/batching/queue.py
  [codec]=gateway/protocol/codec.py
  [tensors]=gateway/protocol/tensors.py
  [policies]=gateway/routing/policies.py
  [estimators]=gateway/routing/estimators.py
  [shared_memory]=gateway/shared_memory.py
  [ensemble]=gateway/ensemble.py
  [response_cache]=gateway/response_cache.py
  [splits]=gateway/splits.py
  [health]=gateway/routing/health.py
  [schedule]=gateway/routing/schedule.py
  [router]=gateway/routing/router.py
)
declare -A TESTS=(
  [batcher]="tests/test_batcher.py tests/test_batcher_pins.py tests/test_batcher_inline.py tests/test_arrivals.py"
  [arrivals]="tests/test_arrivals.py tests/test_batcher.py tests/test_batcher_inline.py"
  [queue]="tests/test_queue.py tests/test_batcher.py tests/test_batcher_pins.py"
  [codec]="tests/test_protocol.py tests/test_codec_pins.py"
  [tensors]="tests/test_protocol.py tests/test_codec_pins.py tests/test_attack_input.py"
  [policies]="tests/test_routing_units.py tests/test_routing_pins.py"
  [estimators]="tests/test_routing_units.py tests/test_routing_pins.py"
  [shared_memory]="tests/test_shared_memory.py"
  [ensemble]="tests/test_ensemble.py"
  [response_cache]="tests/test_response_cache.py"
  [splits]="tests/test_splits.py"
  [health]="tests/test_routing_units.py tests/test_routing_probes.py tests/test_routing_pins.py"
  [schedule]="tests/test_routing_probes.py tests/test_routing_units.py"
  [router]="tests/test_routing_probes.py tests/test_routing_units.py tests/test_routing_pins.py tests/test_routing_aperture.py tests/test_routing_fleet.py"
)
declare -A SERVER_TESTS=(
  [batcher]="tests/test_server.py"
  [arrivals]=""
  [codec]="tests/test_bad_input.py"
  [tensors]="tests/test_bad_input.py"
  [policies]=""
  [estimators]=""
  [queue]=""
  [shared_memory]=""
  [ensemble]=""
  [response_cache]=""
  [splits]=""
  [health]=""
  [schedule]=""
  [router]=""
)

if ! "$VENV/bin/python" -c 'import mutmut, sys; sys.exit(mutmut.__version__ != "3.8.1")' 2>/dev/null; then
  "$VENV/bin/pip" install -q mutmut==3.8.1
fi
"$VENV/bin/python" -c 'import pytest_timeout' 2>/dev/null || "$VENV/bin/pip" install -q pytest-timeout

BASE=${KEEP:-$(mktemp -d /tmp/mutation.XXXXXX)}
: >"$BASE/pgids"
cleanup() {
  while read -r pgid; do kill -TERM -- "-$pgid" 2>/dev/null || true; done <"$BASE/pgids"
  [ -n "$KEEP" ] || rm -rf "$BASE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs mutmut with the server tests added to every function of the module and each mutant's
# tests ordered in-process first, fastest first (-x stops at the first failure).
DRIVER='
import json, os, sys
import mutmut.__main__ as main
from mutmut.mutation.data import SourceFileMutationData
from mutmut.state import state
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.utils.format_utils import mangled_name_from_mutant_name
from mutmut.workers import isolation

SERVER_FILES = set(os.environ["MUTATION_SERVER_TESTS"].split())
collect = main.collect_or_load_stats

def with_server_tests(runner, **kwargs):
    collect(runner, **kwargs)
    server = [t for t in state().duration_by_test if t.split("::")[0] in SERVER_FILES]
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for key in data.exit_code_by_key:
            state().tests_by_mangled_function_name[mangled_name_from_mutant_name(key)].update(server)

def order(tests):
    durations = state().duration_by_test
    return sorted(tests, key=lambda t: (t.split("::")[0] in SERVER_FILES, durations.get(t, 0.0), t))

for cls in (isolation.ForkServerRunner, isolation.ForkRunner):
    def submit(self, name, tests, cpu_limit, estimate, _orig=cls.submit):
        return _orig(self, name, order(tests), cpu_limit, estimate)
    cls.submit = submit

main.collect_or_load_stats = with_server_tests
sys.argv[0] = "mutmut"
main.cli()
'

# A test stopped by pytest-timeout makes the run exit 36, which mutmut counts as a timeout.
PLUGIN='"""Report a pytest-timeout failure as exit status 36 (mutmut: timeout)."""
timed_out = []

def pytest_runtest_logreport(report):
    if report.failed and "from pytest-timeout" in report.longreprtext:
        timed_out.append(report.nodeid)

def pytest_sessionfinish(session, exitstatus):
    if timed_out:
        session.exitstatus = 36
'

REPORT='
import json, sys
from pathlib import Path
module, src, equivalents_file = sys.argv[1:4]
meta = json.loads(Path("mutants", src + ".meta").read_text())
codes = meta["exit_code_by_key"]
equivalent = {}
for line in Path(equivalents_file).read_text().splitlines() if Path(equivalents_file).exists() else []:
    name, _, reason = line.partition("#")
    if name.strip():
        equivalent[name.strip()] = reason.strip()
killed = hangs = 0
survivors, excluded, not_equivalent = [], [], []
not_run = sum(code is None for code in codes.values())  # outside --only
codes = {name: code for name, code in codes.items() if code is not None}
for name, code in sorted(codes.items()):
    if code in (1, 3, -11, -7, -6):  # failed, or crashed it (SIGSEGV, SIGBUS, SIGABRT)
        killed += 1
        if name in equivalent:
            not_equivalent.append(name)
    elif code in (36, 24, -24, 152, 255, -9):  # pytest-timeout, SIGXCPU, killed at the CPU limit
        hangs += 1
    elif name in equivalent:
        excluded.append(name)
    else:
        survivors.append((name, code))
counted = len(codes) - len(excluded)
score = 100.0 * (killed + hangs) / counted if counted else 0.0
print(f"{module:<11} {len(codes):>7} {killed:>6} {hangs:>6} {len(survivors):>8} {len(excluded):>11} {score:>6.1f} %"
      + (f"  ({not_run} not run)" if not_run else ""))
with open("survivors.txt", "w") as out:
    for name, code in survivors:
        out.write(f"{name}  (exit {code})\n")
with open("not-equivalent.txt", "w") as out:
    out.write("".join(n + "\n" for n in not_equivalent))
'

# mutmut in a session of its own, so that what a killed worker leaves (its gateway) goes too.
mutmut_run() {
  local pid rc=0
  setsid "$VENV/bin/python" mutation_driver.py run --max-children "$JOBS" "$@" >>mutmut.log 2>&1 &
  pid=$!
  echo "$pid" >"$BASE/pgids"
  wait "$pid" || rc=$?
  kill -TERM -- "-$pid" 2>/dev/null || true
  : >"$BASE/pgids"
  [ "$rc" -eq 0 ] || tail -30 mutmut.log >&2
  return "$rc"
}

run_module() {
  local module=$1 src=${SRC[$1]} dir="$BASE/$1" tests="" server=""
  # mutants/ exists before Python starts: a PYTHONPATH entry missing at start stays unsearched.
  mkdir -p "$dir/mutants"
  # The tree as it is now: tracked and untracked-not-ignored files (mutants/ and state kept).
  git -C "$ROOT" ls-files -co --exclude-standard -z \
    | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$dir" -xf -
  for t in ${TESTS[$module]}; do [ -e "$dir/$t" ] && tests+="\"$t\", "; done
  for t in ${SERVER_TESTS[$module]}; do [ -e "$dir/$t" ] && { tests+="\"$t\", "; server+="$t "; }; done
  printf '%s' "$PLUGIN" >"$dir/mutation_hangs.py"
  printf '%s' "$DRIVER" >"$dir/mutation_driver.py"
  cat >>"$dir/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["gateway"]
only_mutate = ["$src"]
also_copy = ["mutation_hangs.py", "model_repo"]
pytest_add_cli_args_test_selection = [${tests%, }]
pytest_add_cli_args = ["-p", "mutation_hangs", "-p", "no:cacheprovider", "--timeout", "$TIMEOUT_S"]
process_isolation = "forkserver"
timeout_constant = 10.0
on_dependency_change = "ignore"
use_git_change_detection = false
EOF
  (
    cd "$dir"
    export PYTHONPATH="$dir/mutants" MUTATION_SERVER_TESTS="$server"
    # Only mutants not yet killed when the directory is reused (--keep): new or changed ones
    # first (no names), then the earlier survivors against the current tests.
    echo "$module: running mutmut (log: $dir/mutmut.log)" >&2
    local again=()
    [ -f survivors.txt ] && mapfile -t again < <(cut -d' ' -f1 survivors.txt)
    : >mutmut.log
    if [ ${#ONLY[@]} -gt 0 ]; then
      mutmut_run "${ONLY[@]}" || return 1
    else
      mutmut_run || return 1
      if [ ${#again[@]} -gt 0 ]; then mutmut_run "${again[@]}" || return 1; fi
    fi
    "$VENV/bin/python" -c "$REPORT" "$module" "$src" "$ROOT/scripts/mutation-equivalents.txt" >>"$BASE/table.txt"
  )
}

: >"$BASE/table.txt"
start_s=$SECONDS
for module in "${MODULES[@]}"; do
  run_module "$module" || echo "$module: mutmut failed, see $BASE/$module/mutmut.log" >&2
done
echo
printf '%-11s %7s %6s %6s %8s %11s %8s\n' module mutants killed hangs survived equivalents score
cat "$BASE/table.txt"
echo "($((SECONDS - start_s)) s; per-test timeout ${TIMEOUT_S} s; work dir $BASE)"
for module in "${MODULES[@]}"; do
  f="$BASE/$module/survivors.txt"
  if [ -s "$f" ]; then echo; echo "$module: surviving mutants"; sed 's/^/  /' "$f"; fi
  f="$BASE/$module/not-equivalent.txt"
  if [ -s "$f" ]; then echo "$module: listed as equivalent but killed:"; sed 's/^/  /' "$f"; fi
done
