#!/usr/bin/env bash
# make demo: the three roles on loopback with the counter payload. The
# primary streams checkpoints to the intermediary, which forwards them to
# the backup; after a few seconds the primary is killed (SIGKILL), the
# intermediary fails over, and the backup resumes the guest. The demo then
# checks that the backup's sequence continues after the last record the
# client saw, lets the resumed guest run two seconds and stops it. It
# finishes by itself.
set -euo pipefail
bin=${1:-build/understudy}
dir=build/demo
rm -rf "$dir" && mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$bin" keys init --dir "$dir/keys" >/dev/null
for role in primary intermediary backup; do
	"$bin" keys issue --dir "$dir/keys" --name "$role" --role "$role" >/dev/null
done
echo "demo: keys in $dir/keys; starting backup and intermediary on loopback"
"$bin" backup --keys "$dir/keys" --listen tcp://127.0.0.1:7402 --records "$dir/backup-records.txt" \
	>"$dir/backup-console.txt" 2>"$dir/backup.log" &
backup=$!
pids+=($backup)
sleep 0.5
"$bin" intermediary --keys "$dir/keys" --listen tcp://127.0.0.1:7401 --backup tcp://127.0.0.1:7402 \
	2>"$dir/intermediary.log" &
inter=$!
pids+=($inter)
sleep 0.5
echo "demo: starting the protected primary (counter payload, 25 ms epochs); the client reads released records"
"$bin" run --payload counter,iterations=0,report=0 --mem 64M --protect tcp://127.0.0.1:7401 \
	--keys "$dir/keys" --records "$dir/client-records.txt" 2>&1 >/dev/null | sed 's/^/  primary: /' &
primary=$(pgrep -n -f -- "--protect tcp://127.0.0.1:7401" || true)
for _ in 1 2 3 4; do
	sleep 1
	echo "  client: last record seen: $(tail -n1 "$dir/client-records.txt" 2>/dev/null || echo none)"
done
primary=$(pgrep -f -- "--protect tcp://127.0.0.1:7401" | head -n1)
echo "demo: killing the primary (SIGKILL, pid $primary)"
kill -9 "$primary"
last_seen=$(tail -n1 "$dir/client-records.txt")
wait "$inter" || true
sed 's/^/  intermediary: /' "$dir/intermediary.log" | tail -n 3
# Let the resumed guest run for two seconds, then stop the backup.
for _ in $(seq 1 120); do
	grep -q "first output record" "$dir/backup.log" && break
	sleep 0.5
done
sleep 2
kill -INT "$backup"
wait "$backup" || true
sed 's/^/  backup: /' "$dir/backup.log"
# The backup first releases the records the primary still held (the client
# drops those it has already seen), then the resumed guest's.
first=$(head -n1 "$dir/backup-records.txt")
next=$(awk -v seen="$last_seen" '$1 > seen { print; exit }' "$dir/backup-records.txt")
last=$(tail -n1 "$dir/backup-records.txt")
echo "demo: the client saw records 1..$last_seen; the backup released from $first (duplicates dropped by the client)," \
	"so the client's next record is $next; the guest had reached $last when stopped"
if [ -n "$first" ] && [ "$first" -le $((last_seen + 1)) ] && [ "$next" = $((last_seen + 1)) ] &&
	awk 'NR > 1 && $1 != prev + 1 { exit 1 } { prev = $1 }' "$dir/backup-records.txt"; then
	echo "demo: OK: the client's sequence continues unbroken after the primary's loss"
else
	echo "demo: FAILED: after $last_seen the client would see ${next:-nothing}" >&2
	exit 1
fi
