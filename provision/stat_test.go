package provision

import "syscall"

type syscallStat = syscall.Stat_t

func statFile(p string, st *syscall.Stat_t) error { return syscall.Stat(p, st) }
