package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
)

// Describe reads a whole snapshot from dec and prints a human-readable
// description to w: the process, its registers, each memory area with a
// hash of its saved contents, and the open files. Pages that are all zero
// are left out of the hash, so an area hashes the same whether such a page
// was saved or not.
//
// The decoder decides whether the snapshot is well formed (Next checks
// every record), exactly as for a restore; regNames, when given, also sets
// the number of registers a thread must have.
func Describe(w io.Writer, dec *Decoder, regNames []string) error {
	if regNames != nil {
		dec.CheckRegisters(len(regNames))
	}
	var (
		vmas   []*VMA
		hashes []hash.Hash
		saved  []uint64
		fds    []*FD
		p      *Process
		// objects describe the File records of the process being read.
		objects []string
		ths     []*Thread
	)
	var precopied, dropped uint64 // pre-copy (pfreeze -live)
	var parentBytes uint64        // incremental (pfreeze -parent)
	buf := make([]byte, 1<<20)
	zero := make([]byte, 4096)
	for {
		rec, err := dec.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		switch r := rec.(type) {
		case *Precopy:
			precopied += r.Len
		case *Drop:
			dropped += r.Len
		case *PrecopyArea:
			fmt.Fprintf(w, "Pre-copy area %#x-%#x\n", r.Start, r.End)
		case *PrecopyTree:
			fmt.Fprintf(w, "Pre-copy tree of %d processes\n", len(r.Procs))
		case *PrecopyMember:
			if r.Final {
				fmt.Fprintf(w, "Pre-copy member pid %d (after the stop)\n", r.Pid)
			} else {
				fmt.Fprintf(w, "Pre-copy member pid %d\n", r.Pid)
			}
		case *Round:
			final := ""
			if r.Final {
				final = " (after the stop)"
			}
			fmt.Fprintf(w, "Pre-copy round %d%s: %d bytes of pages, %d bytes dropped so far\n", r.N, final, r.Bytes, dropped)
		case *Tree:
			fmt.Fprintf(w, "Tree of %d processes:\n", len(r.Procs))
			for _, m := range r.Procs {
				fmt.Fprintf(w, "  pid %d ppid %d pgid %d sid %d threads %d", m.Pid, m.PPid, m.Pgid, m.Sid, m.Threads)
				if m.Zombie {
					fmt.Fprintf(w, " zombie (status %#x)", m.ExitStatus)
				}
				if m.Cow {
					fmt.Fprint(w, " cow (forked from its parent, sharing pages)")
				}
				fmt.Fprintln(w)
			}
		case *Namespaces:
			describeNamespaces(w, r)
		case *Process:
			// A tree holds one process after another: describe each.
			if p != nil {
				describeOne(w, p, ths, vmas, hashes, saved, fds, regNames)
				describeObjects(w, objects)
				vmas, hashes, saved, fds, ths, objects = nil, nil, nil, nil, nil, nil
			}
			p = r
		case *Thread:
			ths = append(ths, r)
		case *VMA:
			vmas = append(vmas, r)
			hashes = append(hashes, sha256.New())
			saved = append(saved, 0)
		case *File:
			if r.Kind != 0 {
				kind := map[FileKind]string{FileMemfd: "memfd", FileDeleted: "deleted", FileSysV: "sysv"}[r.Kind]
				line := fmt.Sprintf("File object %#x: %s %q size %d mode %#o seals %#x", r.ID, kind, r.Name, r.Size, r.Mode, r.Seals)
				if r.Kind == FileSysV {
					line += fmt.Sprintf(" key %#x shmid %d uid %d gid %d removed %v", uint32(r.Key), r.ShmID, r.Uid, r.Gid, r.Removed)
				}
				objects = append(objects, line)
			}
		case *FD:
			fds = append(fds, r)
		case *Parent:
			fmt.Fprintf(w, "Parent %s (sha256 %x, %d bytes)\n", r.Path, r.SHA256, r.Size)
		case *ParentPages:
			parentBytes += r.Len()
		case *Pages:
			i := sort.Search(len(vmas), func(i int) bool { return vmas[i].End > r.Addr })
			if i == len(vmas) || r.Addr < vmas[i].Start || r.Addr+r.Len > vmas[i].End {
				return fmt.Errorf("%w: pages %#x+%#x outside every memory area", ErrCorrupt, r.Addr, r.Len)
			}
			addr := r.Addr
			for {
				n, err := dec.ReadData(buf)
				if err == io.EOF {
					break
				}
				if err != nil {
					return err
				}
				for off := 0; off < n; off += 4096 {
					end := min(off+4096, n)
					page := buf[off:end]
					if bytes.Equal(page, zero[:len(page)]) {
						continue
					}
					var o [8]byte
					binary.LittleEndian.PutUint64(o[:], addr+uint64(off)-vmas[i].Start)
					hashes[i].Write(o[:])
					hashes[i].Write(page)
					saved[i] += uint64(len(page))
				}
				addr += uint64(n)
			}
		}
	}
	if p == nil {
		return fmt.Errorf("%w: no process record", ErrCorrupt)
	}
	describeOne(w, p, ths, vmas, hashes, saved, fds, regNames)
	describeObjects(w, objects)
	if parentBytes > 0 {
		fmt.Fprintf(w, "Pages in the parent snapshot (not in the hashes above): %d bytes\n", parentBytes)
	}
	return nil
}

// describeObjects prints the files without a path a process's records
// brought (File records), after its open files.
func describeObjects(w io.Writer, objects []string) {
	for _, o := range objects {
		fmt.Fprintln(w, o)
	}
}

func describeOne(w io.Writer, p *Process, ths []*Thread, vmas []*VMA, hashes []hash.Hash, saved []uint64, fds []*FD, regNames []string) {
	fmt.Fprintf(w, "Process: %s (pid %d), exe %s, cwd %s\n", p.Comm, p.Pid, p.Exe, p.Cwd)
	fmt.Fprintf(w, "Frozen on %s (kernel %s), %d thread(s)\n", p.Host, p.Kernel, p.Threads)
	if p.LeaderExited {
		fmt.Fprintf(w, "Main thread %d had exited (pthread_exit): a zombie until the last thread ends\n", p.Pid)
	}
	c := p.Creds
	fmt.Fprintf(w, "Credentials: uid %v gid %v groups %v cap_eff %#x cap_prm %#x cap_bnd %#x\n", c.Uid, c.Gid, c.Groups, c.CapEff, c.CapPrm, c.CapBnd)
	fmt.Fprintf(w, "mm: code %#x-%#x data %#x-%#x brk %#x-%#x stack %#x\n", p.MM.StartCode, p.MM.EndCode, p.MM.StartData, p.MM.EndData, p.MM.StartBrk, p.MM.Brk, p.MM.StartStack)
	for _, s := range p.Sigacts {
		fmt.Fprintf(w, "Signal %d: handler %#x flags %#x mask %#x\n", s.Sig, s.Handler, s.Flags, s.Mask)
	}
	describeSeccomp(w, "", p.Seccomp)
	for _, tm := range p.Timers {
		fmt.Fprintf(w, "POSIX timer %d: clock %d notify %d signal %d value %#x tid %d left %dns interval %dns overrun %d\n",
			tm.ID, tm.Clock, tm.Notify, tm.Signo, tm.Value, tm.Tid, tm.ValueNs, tm.IntervalNs, tm.Overrun)
	}
	for _, t := range ths {
		fmt.Fprintf(w, "Thread %d registers:\n", t.Tid)
		for i, v := range t.Regs {
			name := fmt.Sprint(i)
			if i < len(regNames) {
				name = regNames[i]
			}
			fmt.Fprintf(w, "  %-8s 0x%016x", name, v)
			if i%3 == 2 || i == len(t.Regs)-1 {
				fmt.Fprintln(w)
			}
		}
		fmt.Fprintf(w, "  xstate %d bytes sha256 %x, sigmask %#x, rseq %#x/%d, tid_address %#x, robust_list %#x\n",
			len(t.XState), sha256.Sum256(t.XState), t.Sigmask, t.RseqAddr, t.RseqLen, t.TidAddress, t.RobustList)
		describeSeccomp(w, "  ", t.Seccomp)
		if c := t.Creds; c != nil {
			fmt.Fprintf(w, "  credentials of its own: uid %v gid %v groups %v cap_eff %#x cap_prm %#x no_new_privs %v\n", c.Uid, c.Gid, c.Groups, c.CapEff, c.CapPrm, c.NoNewPrivs)
		}
	}
	fmt.Fprintln(w, "Memory:")
	for i, v := range vmas {
		prot := []byte("---")
		if v.Prot&1 != 0 {
			prot[0] = 'r'
		}
		if v.Prot&2 != 0 {
			prot[1] = 'w'
		}
		if v.Prot&4 != 0 {
			prot[2] = 'x'
		}
		share := "p"
		if v.Shared {
			share = "s"
		}
		fmt.Fprintf(w, "  %d %#x-%#x %s%s %-11s %-40s saved %8d sha256 %x", i, v.Start, v.End, prot, share,
			v.Kind, strings.TrimSpace(v.Name), saved[i], hashes[i].Sum(nil)[:16])
		if v.Object != 0 {
			fmt.Fprintf(w, " object %#x", v.Object)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "Files:")
	for _, f := range fds {
		kind := map[FDKind]string{FDFile: "file", FDInherit: "inherit", FDEventfd: "eventfd", FDEpoll: "epoll", FDPipe: "pipe", FDListen: "listen", FDTCP: "tcp", FDUDP: "udp", FDTCPNew: "tcp-unconnected",
			FDTimerfd: "timerfd", FDSignalfd: "signalfd", FDInotify: "inotify", FDFanotify: "fanotify", FDUnix: "unix", FDPipeOut: "pipe-outside", FDPtyMaster: "pty-master", FDPtySlave: "pty-slave"}[f.Kind]
		if f.Kind == FDPipe && f.Path != "" {
			kind = "fifo"
		}
		fmt.Fprintf(w, "  fd %d: %s %q flags %#o pos %d mode %#o desc %d", f.Fd, kind, f.What, f.Flags, f.Pos, f.Mode, f.Desc)
		if f.Object != 0 {
			fmt.Fprintf(w, " object %#x", f.Object)
		}
		if f.Owner != 0 || f.Signal != 0 {
			fmt.Fprintf(w, " owner %d signal %d", f.Owner, f.Signal)
		}
		if f.Kind == FDPipe || f.Kind == FDPipeOut {
			fmt.Fprintf(w, " pipe %d size %d buffered %d", f.Pipe, f.PipeSize, len(f.PipeData))
		}
		if f.Kind == FDEventfd {
			fmt.Fprintf(w, " count %d semaphore %v", f.EventCount, f.Semaphore)
		}
		if l := f.Listen; l != nil {
			fmt.Fprintf(w, " %v port %d protocol %d", net.IP(l.IP), l.Port, l.Protocol)
		}
		if c := f.TCP; c != nil && c.Closed {
			fmt.Fprintf(w, " %s -> %s closed (its address stays)", c.Local, c.Peer)
		} else if c != nil {
			fmt.Fprintf(w, " %s -> %s state %s send queue %d (unsent %d) receive queue %d seq %d/%d mss %d options %#x",
				c.Local, c.Peer, TCPStateName(c.State), len(c.SendQueue), c.Unsent, len(c.RecvQueue), c.SendSeq, c.RecvSeq, c.MSS, c.Options)
		}
		if u := f.UDP; u != nil {
			fmt.Fprintf(w, " %s", u.Local)
			if u.Peer != nil {
				fmt.Fprintf(w, " -> %s", *u.Peer)
			}
			if o := u.Opts; o.Priority != 0 || o.RcvLowat > 1 || o.Mark != 0 || o.DontRoute || o.NoCheck || o.OOBInline || o.BindToDevice != "" {
				fmt.Fprintf(w, " priority %d rcvlowat %d mark %d dontroute %v nocheck %v oobinline %v device %q",
					o.Priority, o.RcvLowat, o.Mark, o.DontRoute, o.NoCheck, o.OOBInline, o.BindToDevice)
			}
		}
		if u := f.Unix; u != nil && (u.PassCred || u.PassSec) {
			fmt.Fprintf(w, " passcred %v passsec %v", u.PassCred, u.PassSec)
		}
		if u := f.Unix; u != nil && u.Listen {
			fmt.Fprintf(w, " %s socket %d listening on %q mode %#o owner %d:%d",
				map[int]string{sockStream: "stream", sockSeqpacket: "seqpacket"}[u.Type], u.ID, u.Name, u.Mode, u.Uid, u.Gid)
		} else if u != nil && u.PeerClosed {
			fmt.Fprintf(w, " %s socket %d, its peer closed, queue %d bytes", map[int]string{sockStream: "stream", sockSeqpacket: "seqpacket"}[u.Type], u.ID, queueLen(u.Queue))
		} else if u != nil && u.Handover != nil {
			fmt.Fprintf(w, " %s socket %d connected outside, handed over from pid %d fd %d", map[int]string{sockStream: "stream", sockDgram: "dgram", sockSeqpacket: "seqpacket"}[u.Type], u.ID, u.Handover.Pid, u.Handover.Fd)
		} else if u != nil && u.Peer == 0 && u.Connect == "" {
			fmt.Fprintf(w, " %s socket %d unconnected, bound to %q", map[int]string{sockStream: "stream", sockDgram: "dgram", sockSeqpacket: "seqpacket"}[u.Type], u.ID, u.Name)
		} else if u != nil && u.Connect != "" {
			fmt.Fprintf(w, " %s socket %d reconnects to %q", map[int]string{sockStream: "stream", sockDgram: "dgram", sockSeqpacket: "seqpacket"}[u.Type], u.ID, u.Connect)
		} else if u != nil {
			n := 0
			for _, m := range u.Queue {
				n += len(m)
			}
			fmt.Fprintf(w, " %s socket %d peer %d queued %d messages %d bytes shutdown %d",
				map[int]string{sockStream: "stream", sockDgram: "dgram", sockSeqpacket: "seqpacket"}[u.Type], u.ID, u.Peer, len(u.Queue), n, u.Shutdown)
			for i, r := range u.Rights {
				if len(r) == 0 {
					continue
				}
				fds := make([]string, len(r))
				for j, x := range r {
					if fds[j] = strconv.Itoa(x); u.Holder(i, j) != 0 {
						fds[j] += fmt.Sprintf(" of pid %d", u.Holder(i, j))
					}
				}
				fmt.Fprintf(w, " [message %d carries fds [%s]]", i, strings.Join(fds, " "))
			}
		}
		if t := f.Pty; t != nil {
			fmt.Fprintf(w, " index %d window %dx%d locked %v packet %v", t.Index, t.Rows, t.Cols, t.Locked, t.Packet)
			if tt := t.Termios; tt != nil {
				fmt.Fprintf(w, " iflag %#o oflag %#o cflag %#o lflag %#o", tt.Iflag, tt.Oflag, tt.Cflag, tt.Lflag)
			}
			if t.Ctty {
				fmt.Fprintf(w, " controlling terminal (foreground group %d)", t.Tpgid)
			}
		}
		if tm := f.Timer; tm != nil {
			fmt.Fprintf(w, " clock %d value %dns interval %dns ticks %d set-flags %#o", tm.Clock, tm.ValueNs, tm.IntervalNs, tm.Ticks, tm.SetFlags)
		}
		if f.Kind == FDSignalfd {
			fmt.Fprintf(w, " sigmask %#x", f.SigMask)
		}
		if fa := f.Fanotify; fa != nil {
			fmt.Fprintf(w, " flags %#x event-flags %#x", fa.Flags, fa.EventFlags)
			for _, m := range fa.Marks {
				fmt.Fprintf(w, " [%s %s mask %#x ignored %#x flags %#x]", []string{"inode", "mount", "filesystem"}[m.Kind], m.Path, m.Mask, m.Ignored, m.Flags)
			}
		}
		for _, iw := range f.Watches {
			if iw.Object != 0 {
				fmt.Fprintf(w, " [wd %d mask %#x %s (deleted) object %#x]", iw.Wd, iw.Mask, iw.Path, iw.Object)
			} else {
				fmt.Fprintf(w, " [wd %d mask %#x %s]", iw.Wd, iw.Mask, iw.Path)
			}
		}
		for _, t := range f.Epoll {
			if t.Via != nil {
				fmt.Fprintf(w, " [fd %d (now fd %d) events %#x data %#x]", t.Fd, *t.Via, t.Events, t.Data)
				continue
			}
			fmt.Fprintf(w, " [fd %d events %#x data %#x]", t.Fd, t.Events, t.Data)
		}
		fmt.Fprintln(w)
	}
}

// describeSeccomp prints a chain of seccomp filters, oldest first.
func describeSeccomp(w io.Writer, indent string, fs []SeccompFilter) {
	for i, f := range fs {
		fmt.Fprintf(w, "%sSeccomp filter %d: %d instructions flags %#x sha256 %x\n", indent, i, len(f.Prog)/8, f.Flags, sha256.Sum256(f.Prog))
	}
}

// queueLen is the bytes queued in a unix socket's messages.
func queueLen(q [][]byte) int {
	n := 0
	for _, m := range q {
		n += len(m)
	}
	return n
}
