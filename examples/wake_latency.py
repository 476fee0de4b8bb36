#!/usr/bin/env python3
"""This machine's own wake-up latency, without the runtime: a parent and a child process
ping-pong one byte over pipes, sleeping between round trips so the CPUs go idle — the baseline
for the outliers in bench_pool's claim latencies (BENCHMARKS.md).

Run with: python3 examples/wake_latency.py [ROUND_TRIPS [IDLE_SECONDS]]   (default 100 0.5)
"""
import os, time, sys
r1, w1 = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    while True:
        b = os.read(r1, 1)
        if not b or b == b'q': os._exit(0)
        os.write(w2, b)
rtts = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 100):
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
    t = time.perf_counter()
    os.write(w1, b'x'); os.read(r2, 1)
    rtts.append((time.perf_counter() - t) * 1000)
os.write(w1, b'q'); os.wait()
rtts.sort()
n = len(rtts)
print(f"n={n} p50={rtts[n//2]:.3f} ms p99={rtts[int(n*0.99)]:.3f} max={rtts[-1]:.3f} >2ms={sum(1 for x in rtts if x>2)} >4ms={sum(1 for x in rtts if x>4)}")
