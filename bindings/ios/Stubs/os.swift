// Stand-in for <os/proc.h>; see README.md.
public func os_proc_available_memory() -> Int { 0 }
