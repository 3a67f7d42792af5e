#!/usr/bin/env bash
# Runs every Go fuzz target of the repository (each `func FuzzXxx(f
# *testing.F)` in a _test.go file) for a fixed time, one target after the
# other, on FUZZPARALLEL workers (default 1). Usage: script/fuzz.sh [time],
# time as go test's -fuzztime takes it (default 10s; `make fuzz
# FUZZTIME=5m` searches longer). A failing input is written to the
# package's testdata/fuzz/<target>/, where every later `go test` replays
# it: commit it with the fix.
#
# go1.26's fuzz coordinator can end a run that found nothing with a bare
# "context deadline exceeded" when -fuzztime expires (golang/go#75804, fixed
# in go1.27): such a run, with no failing input, a failing seed or any other
# message, is reported and not counted as a failure.
set -uo pipefail

cd "$(dirname "$0")/.."

fuzztime=${1:-10s}
parallel=${FUZZPARALLEL:-1}
# Minimizing each new corpus entry for the default 60 s would take most of
# a short run; crashers are still minimized, for this long.
minimize=${FUZZMINIMIZETIME:-5s}

failed=()
ran=0
start=$SECONDS
while IFS=: read -r file name; do
	pkg=./$(dirname "$file")/
	out=$(go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimize" \
		-parallel "$parallel" "$pkg" 2>&1)
	rc=$?
	ran=$((ran + 1))
	execs=$(grep -o 'execs: [0-9]*' <<<"$out" | tail -1)
	if [ $rc -eq 0 ]; then
		echo "fuzz: ok   $name ($pkg, $fuzztime, ${execs:-no execs reported})"
		continue
	fi
	# The coordinator's race: the target's only failure line is the bare
	# deadline, and no input was written.
	fails=$(grep -c -e '--- FAIL' <<<"$out")
	if [ "$fails" -eq 1 ] && ! grep -q 'Failing input written' <<<"$out" &&
		grep -A1 -e "^--- FAIL: ${name} (" <<<"$out" | tail -1 | grep -qx '[[:space:]]*context deadline exceeded'; then
		echo "fuzz: ok   $name ($pkg, $fuzztime, ${execs:-no execs reported}; ended by golang/go#75804, no failing input)"
		continue
	fi
	echo "$out"
	echo "fuzz: FAIL $name ($pkg)"
	failed+=("$name")
done < <(grep -rHo --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(f \*testing\.F\)' . |
	sed -E 's|^\./||; s|:func (Fuzz[A-Za-z0-9_]*)\(.*|:\1|' | sort)

echo "fuzz: $ran targets in $((SECONDS - start))s, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
