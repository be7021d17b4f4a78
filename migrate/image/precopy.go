package image

// Pre-copy records (pfreeze -live) carry memory sent while the process
// still runs, in rounds, before its process record: a receiver keeps the
// pages (a later one replaces an earlier one at the same address), forgets
// the ranges a Drop names, and writes what it kept into the process once
// its memory areas exist, before the pages records of the snapshot proper.

// Precopy introduces a run of page contents at Addr sent before the stop;
// its data (Len bytes) follows as for Pages (Decoder.ReadData).
type Precopy struct {
	Addr uint64
	Len  uint64
}

// Drop says that pages sent earlier in [Addr, Addr+Len) are no longer the
// process's: they read as zero, or the area is sent again in full.
type Drop struct {
	//lint:ignore U1000 read by msgpack: encode as an array
	_msgpack struct{} `msgpack:",as_array"`
	Addr     uint64
	Len      uint64
}

// PrecopyArea announces, before the first Precopy record, a private
// anonymous area of the running process whose pages follow: a receiver may
// map it at once and write pre-copied pages straight into the process it
// builds, instead of keeping them until the stop (skippable: a reader that
// does not know it keeps every page). If the area is gone or changed at
// the stop, a Drop of all of it follows.
type PrecopyArea struct {
	//lint:ignore U1000 read by msgpack: encode as an array
	_msgpack struct{} `msgpack:",as_array"`
	Start    uint64
	End      uint64
}

// PrecopyMember, in a live migration of a process tree (pfreeze -live
// -tree), says that the pre-copy records after it, up to the next
// PrecopyMember, are for the member with saved PID Pid (the namespace's
// number in a PID namespace frozen whole): every member has an address
// space of its own. Final says that the member was found again, the same
// process, at the stop: its last round follows. A receiver uses the
// pages of a member only once it saw its final PrecopyMember; a member
// that was gone at the stop (another process may have its PID by then)
// never has one, and its pages are forgotten. A tree's pre-copy records,
// final rounds included, all come before its tree record.
type PrecopyMember struct {
	Pid   int  `msgpack:"pid"`
	Final bool `msgpack:"final,omitempty"`
}

// PrecopyTree announces, in a tree's live migration, before its first
// PrecopyMember record, the members being pre-copied as they were when
// the pre-copy started (every parent before its children), and Avoid,
// every range any of them had mapped then. Each member's PrecopyArea
// records then follow a PrecopyMember record naming it, before the first
// Precopy record. A reader may make the tree's processes at once (each
// forked from its parent's, in its group and session), map the announced
// areas and write the rounds straight into them; the tree record at the
// stop says whether the tree is still the one announced (skippable: a
// reader that does not know it keeps every member's pages until its
// process is made).
type PrecopyTree struct {
	Procs []PrecopyProc `msgpack:"procs"`
	Avoid [][2]uint64   `msgpack:"avoid,omitempty"`
}

// PrecopyProc is a member of an announced tree: its saved PID, parent,
// process group and session, as in TreeProc.
type PrecopyProc struct {
	Pid  int `msgpack:"pid"`
	PPid int `msgpack:"ppid"`
	Pgid int `msgpack:"pgid"`
	Sid  int `msgpack:"sid"`
}

// Round closes one pre-copy round: its number (0 is the first, full
// copy) and the bytes of page contents it sent. The round sent after the
// stop has Final set.
type Round struct {
	N     int    `msgpack:"n"`
	Bytes uint64 `msgpack:"bytes"`
	Final bool   `msgpack:"final,omitempty"`
	// At, on the final round, is when the process (every member of a
	// tree) was stopped for it, in unix nanoseconds of the sender's clock.
	At int64 `msgpack:"at,omitempty"`
}

// checkPrecopy checks a pre-copy record's range: page aligned, inside the
// user address space.
func checkPrecopy(addr, n uint64) error {
	if addr%pageSize != 0 || n%pageSize != 0 || n == 0 || addr >= MaxAddr || n > MaxAddr-addr {
		return corruptf("pre-copy range %#x+%#x", addr, n)
	}
	return nil
}
