#!/usr/bin/python3
"""seccomp-exec.py PROFILE.json COMMAND [ARGS...]

Installs the OCI seccomp profile PROFILE (what a container runtime would
install for a container) on this process, then execs COMMAND under it:
the command runs with exactly the system calls the profile allows.
Needs Debian's python3-seccomp (libseccomp's bindings), hence
/usr/bin/python3.
"""
import json
import os
import sys

import seccomp

EPERM = 1
OPS = {
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}


def action(name, errno):
    if name == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(errno or EPERM)
    raise SystemExit(f"seccomp-exec: action {name} is not supported")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as file:
        profile = json.load(file)
    # runc's default errno for a refused call is EPERM.
    default = action(profile["defaultAction"], profile.get("defaultErrnoRet"))
    rules = seccomp.SyscallFilter(defaction=default)
    unknown = []
    for rule in profile.get("syscalls") or []:
        act = action(rule["action"], rule.get("errnoRet"))
        args = [
            seccomp.Arg(arg["index"], OPS[arg["op"]], arg["value"], arg.get("valueTwo", 0))
            for arg in rule.get("args") or []
        ]
        for name in rule["names"]:
            try:
                rules.add_rule(act, name, *args)
            except (RuntimeError, ValueError):
                # A call this libseccomp or this architecture does not
                # know: runc skips those too.
                unknown.append(name)
    rules.load()
    os.execvp(sys.argv[2], sys.argv[2:])


main()
