package image

import "testing"

// TestForkLate checks which members may be forked from their parent once
// its memory is built (MayForkLate) and which trees marked so CheckTree
// takes as sound: whoever is in a group or session a late member leads
// must be late too, after it.
func TestForkLate(t *testing.T) {
	// 10 the root; 11 its child leading a session, with 12, its child,
	// and 13, its grandchild, in it.
	tree := func(cow ...int) []TreeProc {
		procs := []TreeProc{
			{Pid: 10, PPid: 1, Pgid: 10, Sid: 10, Threads: 1},
			{Pid: 11, PPid: 10, Pgid: 11, Sid: 11, Threads: 1},
			{Pid: 12, PPid: 11, Pgid: 11, Sid: 11, Threads: 1},
			{Pid: 13, PPid: 12, Pgid: 11, Sid: 11, Threads: 1},
		}
		for _, c := range cow {
			procs[c].Cow = true
		}
		return procs
	}
	procs := tree()
	for i, want := range []bool{false, true, true, true} {
		if got := MayForkLate(procs, i); got != want {
			t.Errorf("MayForkLate(pid %d) = %v, want %v", procs[i].Pid, got, want)
		}
	}
	if late := LateMembers(tree(1)); len(late) != 3 || late[11] != 1 || late[13] != 3 {
		t.Errorf("LateMembers with 11 cow: %v, want 11, 12 and 13", late)
	}
	for _, cow := range [][]int{{1}, {2}, {1, 3}} {
		if err := CheckTree(&Tree{Procs: tree(cow...)}); err != nil {
			t.Errorf("cow %v: %v", cow, err)
		}
	}
	// 14, the root's child, forked early, in 11's group (impossible
	// across sessions, but a damaged snapshot may say so).
	bad := append(tree(), TreeProc{Pid: 14, PPid: 10, Pgid: 11, Sid: 10, Threads: 1})
	if MayForkLate(bad, 1) {
		t.Errorf("MayForkLate(11) with 14, forked early, in its group")
	}
	if err := CheckTree(&Tree{Procs: append(tree(1), TreeProc{Pid: 14, PPid: 10, Pgid: 11, Sid: 10, Threads: 1})}); err == nil {
		t.Errorf("CheckTree takes 11 late with 14, forked early, in its group")
	}
	if err := CheckTree(&Tree{Procs: tree(0)}); err == nil {
		t.Errorf("CheckTree takes the root late")
	}
}
