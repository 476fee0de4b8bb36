#!/bin/sh
# The `hello` task of config/actors.toml: an `exec` handler, in plain POSIX sh.
#
# The runtime runs it (without a shell of its own) in its own process group with a clean
# environment: PATH, RT_TASK_ID, RT_TASK, RT_QUEUE (and RT_EGRESS_URL / RT_EGRESS_TOKEN for the
# egress proxy) — nothing else of the runtime's. The task's envelope arrives as one JSON line on
# stdin; the last line printed on stdout is the result (JSON, else a string). Exit 0: success;
# 75: try again later (retried); anything else: failed for good. stderr lines are logged with
# the task id. At the soft time limit the process group gets SIGTERM; at the hard one, SIGKILL.
#
#   runtime enqueue hello --args '["world"]' --wait
set -eu
envelope=
read -r envelope || [ -n "$envelope" ]
printf 'hello: task %s, %s bytes of envelope\n' "$RT_TASK_ID" "${#envelope}" >&2
# The first argument, when it is a plain string (no quote or backslash in it), else "world".
name=$(printf '%s\n' "$envelope" | sed -n 's/.*"args":\["\([^"\\]*\)".*/\1/p')
# A task id may hold `"` or `\` (never a control character): escaped for JSON.
id=$(printf '%s' "$RT_TASK_ID" | sed 's/\\/\\\\/g; s/"/\\"/g')
printf '{"greeting":"hello, %s","task":"%s","queue":"%s","task_id":"%s"}\n' \
  "${name:-world}" "$RT_TASK" "$RT_QUEUE" "$id"
