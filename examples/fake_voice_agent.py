#!/usr/bin/env python3
"""A stand-in for the pipecat/LiveKit voice bot of incident 002, for pools and their tests.

Run with: python3 examples/fake_voice_agent.py [--startup-delay 1.5] [--session 5] ...

Behaves like the real bot: logs loguru-style start-up lines to stderr (pipecat and LiveKit
log there; stdout is block-buffered on a pipe) after ~1.5 s, then the ready line
"Pipeline ready, waiting for a participant"; waits for ONE JSON assignment line on stdin
(e.g. {"room": "room-42"}); logs "Connected to <room>"; runs the session for a while; exits.
A prewarmed agent never logs "Connected to" before it is assigned (the incident's bug was
waiting for that line to call it ready).

Flags (the start-up delay can also come from FAKE_AGENT_STARTUP_DELAY):
  --startup-delay S   seconds before the start-up lines (default 1.5)
  --session S         seconds the session lasts after "Connected to" (default 5)
  --hang              never become ready (start-up hangs)
  --crash             exit 1 at start
  --leak-mb N         once ready, allocate and touch N MB (in 16 MB steps)
  --ignore-sigterm    ignore SIGTERM (only SIGKILL ends it)
  --ready-on-stdout   print the ready line to stdout (flushed) instead of stderr
  --sessions N        serve N sessions, logging the ready line again after each (default 1;
                      for pools with `reusable = true`)
  --tag T             ignored; lets tests find their own processes in /proc
"""

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime


def log(level, where, message):
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    sys.stderr.write(f"{stamp} | {level:<8} | {where} - {message}\n")
    sys.stderr.flush()


def main():
    parser = argparse.ArgumentParser(description="fake pipecat/LiveKit voice agent")
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=float(os.environ.get("FAKE_AGENT_STARTUP_DELAY", "1.5")),
    )
    parser.add_argument("--session", type=float, default=5.0)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--leak-mb", type=int, default=0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--ready-on-stdout", action="store_true")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(_signum, _frame):
            log("INFO", "__main__:on_term:60", "SIGTERM: leaving the room")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)

    agent = os.environ.get("RT_AGENT_ID", "unknown")
    log("INFO", "__main__:validate_environment:59", "✓ Environment variables validated")
    log("INFO", "__main__:main:70", f"Starting voice assistant bot {agent}...")
    if args.crash:
        log("ERROR", "__main__:main:72", "LIVEKIT_URL is not set; cannot start")
        return 1
    if args.hang:
        while True:
            time.sleep(3600)

    time.sleep(args.startup_delay * 0.85)
    log("DEBUG", "pipecat.audio.vad.silero:__init__:169", "Loaded Silero VAD")
    log("DEBUG", "pipecat.audio.turn.smart_turn.local_smart_turn_v3:__init__:78",
        "Loaded Local Smart Turn v3")
    log("INFO", "__main__:main:97", "LiveKit transport created")
    log("INFO", "__main__:main:105", "AssemblyAI STT service initialized")
    log("INFO", "__main__:main:116", "Groq LLM service initialized")
    log("INFO", "__main__:main:143", "Inworld TTS service initialized")
    time.sleep(args.startup_delay * 0.15)
    ready = "Pipeline ready, waiting for a participant"
    if args.ready_on_stdout:
        print(ready, flush=True)
    else:
        log("INFO", "__main__:main:150", ready)

    hog = []
    left = args.leak_mb
    while left > 0:
        step = min(16, left)
        hog.append(b"\x01" * (step << 20))  # written, so resident
        left -= step
        time.sleep(0.02)

    for session in range(args.sessions):
        if session > 0:
            log("INFO", "__main__:main:150", ready)
        line = sys.stdin.readline()
        if not line:
            log("INFO", "__main__:main:160", "stdin closed before an assignment; exiting")
            return 0
        try:
            assignment = json.loads(line)
        except ValueError as err:
            log("ERROR", "__main__:main:165", f"bad assignment: {err}")
            return 2
        # A claim's body ({"room": ...}) or, from the `pool` task handler, the task's envelope
        # ({"id": ..., "task": ..., "kwargs": {"room": ...}, ...}).
        room = "unknown"
        if isinstance(assignment, dict):
            kwargs = assignment.get("kwargs")
            room = (assignment.get("room")
                    or (kwargs.get("room") if isinstance(kwargs, dict) else None) or room)
        log("INFO", "pipecat.transports.livekit:connect:412", f"Connected to {room}")
        time.sleep(args.session)
        log("INFO", "__main__:on_participant_left:190", "Participant left; session ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
