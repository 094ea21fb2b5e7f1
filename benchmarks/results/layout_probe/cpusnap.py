"""Per-process CPU seconds between two snapshots: python cpusnap.py SECONDS"""
import os, sys, time
HZ = os.sysconf("SC_CLK_TCK")
def snap():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            with open(f"/proc/{pid}/stat") as f: s = f.read()
            comm = s[s.index("(")+1:s.rindex(")")]
            fields = s[s.rindex(")")+2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / HZ
            with open(f"/proc/{pid}/cmdline","rb") as f: cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:110]
            out[pid] = (comm, cmd, cpu, int(fields[16]))
        except Exception: pass
    return out
a = snap(); t = float(sys.argv[1]); time.sleep(t); b = snap()
rows = []
for pid, (comm, cmd, cpu, nice) in b.items():
    d = cpu - a.get(pid, (0,0,0))[2] if pid in a else cpu
    if d / t > 0.01: rows.append((d / t, pid, nice, comm, cmd))
for r in sorted(rows, reverse=True): print(f"{r[0]:.3f} {r[1]:>7} nice{r[2]:>3} {r[3][:20]:20} {r[4]}")
print("total", round(sum(r[0] for r in rows), 3))
