// Package image defines the snapshot records — the complete state of a
// frozen process — and their encoding: a stream of typed, length-framed
// msgpack records closed by an end record that carries a CRC-32C of every
// byte before it. The format is specified in docs/snapshot-format.md.
//
// The package knows nothing of ptrace or of how a process is rebuilt; it is
// shared by the capture side (migrate/capture) and the loader.
package image

// Type is the one-byte record type. The list is append-only: a value, once
// released, keeps its meaning forever. Types with the Skippable bit set may
// be ignored by a reader that does not know them; any other unknown type is
// an error.
type Type uint8

const (
	TypeProcess Type = 1
	TypeThread  Type = 2
	TypeVMA     Type = 3
	TypePages   Type = 4
	TypeFD      Type = 5
	TypeEnd     Type = 6
	TypeTree    Type = 7
	TypeFile    Type = 8
	// Incremental snapshots (pfreeze -parent, parent.go).
	TypeParent      Type = 9
	TypeParentPages Type = 10
	// TypeNamespaces follows a container's Tree record (namespaces.go).
	TypeNamespaces Type = 20
	// Pre-copy (pfreeze -live): memory sent while the process still
	// runs, before its process record (precopy.go).
	TypePrecopy Type = 40
	TypeDrop    Type = 41
	TypeRound   Type = 42
	// TypePrecopyArea is a hint a reader may skip: map the area now.
	TypePrecopyArea Type = Skippable | 43
	// TypePrecopyMember says which member of a tree the pre-copy
	// records after it are for.
	TypePrecopyMember Type = 44
	// TypePrecopyTree is a hint a reader may skip: build a tree's
	// processes now.
	TypePrecopyTree Type = Skippable | 45

	// Skippable marks a record that older readers may skip.
	Skippable Type = 0x80
)

func (t Type) String() string {
	switch t {
	case TypeProcess:
		return "process"
	case TypeThread:
		return "thread"
	case TypeVMA:
		return "vma"
	case TypePages:
		return "pages"
	case TypeFD:
		return "fd"
	case TypeEnd:
		return "end"
	case TypeTree:
		return "tree"
	case TypeFile:
		return "file"
	case TypeParent:
		return "parent"
	case TypeParentPages:
		return "parent pages"
	case TypeNamespaces:
		return "namespaces"
	case TypePrecopy:
		return "precopy pages"
	case TypeDrop:
		return "precopy drop"
	case TypeRound:
		return "precopy round"
	case TypePrecopyArea:
		return "precopy area"
	case TypePrecopyMember:
		return "precopy member"
	case TypePrecopyTree:
		return "precopy tree"
	}
	return "unknown"
}

// Process is the per-process state (everything shared by its threads).
type Process struct {
	Pid         int    `msgpack:"pid"`
	Comm        string `msgpack:"comm"`
	Exe         string `msgpack:"exe"`
	Cwd         string `msgpack:"cwd"`
	Umask       uint32 `msgpack:"umask"`
	Personality uint64 `msgpack:"personality"`
	Dumpable    int    `msgpack:"dumpable"`
	PdeathSig   int    `msgpack:"pdeathsig"`
	Kernel      string `msgpack:"kernel"`
	Host        string `msgpack:"host"`
	FrozenAt    int64  `msgpack:"frozen_at"` // unix nanoseconds

	Creds   Creds      `msgpack:"creds"`
	Rlimits []Rlimit   `msgpack:"rlimits"` // indexed by RLIMIT_* resource number
	MM      MM         `msgpack:"mm"`
	Auxv    []uint64   `msgpack:"auxv"`
	Sigacts []Sigact   `msgpack:"sigacts"` // only signals whose action is not SIG_DFL
	Itimers []Itimer   `msgpack:"itimers"` // ITIMER_REAL, _VIRTUAL, _PROF
	Pending []Siginfo  `msgpack:"pending"` // process-wide pending signals
	Threads int        `msgpack:"threads"`
	Extra   [][]string `msgpack:"extra,omitempty"` // reserved
	// Seccomp holds the seccomp filters every thread shares, oldest
	// first (each thread's own, installed after these, are in its
	// Thread record).
	Seccomp []SeccompFilter `msgpack:"seccomp,omitempty"`
	// Timers are the POSIX timers (timer_create), by id.
	Timers []PosixTimer `msgpack:"timers,omitempty"`

	// LeaderExited: the main thread had ended (pthread_exit) while the
	// others ran on, a zombie until the last of them ends. No thread
	// record is the main thread's; Threads counts the others, and the
	// restore makes the main thread exit again before the process runs.
	LeaderExited bool `msgpack:"leader_exited,omitempty"`
}

// PosixTimer is one POSIX timer (timer_create) and its state.
type PosixTimer struct {
	ID     int    `msgpack:"id"`
	Clock  int    `msgpack:"clock"`
	Notify int    `msgpack:"notify"` // sigev_notify: SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID
	Signo  int    `msgpack:"signo"`
	Value  uint64 `msgpack:"value"`         // sigev_value
	Tid    int    `msgpack:"tid,omitempty"` // SIGEV_THREAD_ID: the thread signalled
	// ValueNs is the time left to the next expiration (0: disarmed),
	// IntervalNs the period, both as timer_gettime read them at
	// ReadAtUnixNs (wall clock); Overrun is timer_getoverrun's.
	ValueNs      int64 `msgpack:"value_ns"`
	IntervalNs   int64 `msgpack:"interval_ns"`
	Overrun      int   `msgpack:"overrun"`
	ReadAtUnixNs int64 `msgpack:"read_at_ns"`
}

// MaxTimers bounds a process's POSIX timers.
const MaxTimers = 1 << 16

// SeccompFilter is one installed seccomp filter: its classic BPF program
// (struct sock_filter array, 8 bytes an instruction) and the
// SECCOMP_FILTER_FLAG_* it was installed with that the kernel reports
// (SECCOMP_FILTER_FLAG_LOG).
type SeccompFilter struct {
	Prog  []byte `msgpack:"prog"`
	Flags uint64 `msgpack:"flags,omitempty"`
}

// MaxSeccompInsns bounds a filter's length (BPF_MAXINSNS).
const MaxSeccompInsns = 4096

// MaxSeccompFilters bounds a thread's chain of filters.
const MaxSeccompFilters = 512

// Creds are the process credentials as /proc/PID/status reports them.
type Creds struct {
	Uid        [4]uint32 `msgpack:"uid"` // real, effective, saved, fs
	Gid        [4]uint32 `msgpack:"gid"`
	Groups     []uint32  `msgpack:"groups"`
	CapInh     uint64    `msgpack:"cap_inh"`
	CapPrm     uint64    `msgpack:"cap_prm"`
	CapEff     uint64    `msgpack:"cap_eff"`
	CapBnd     uint64    `msgpack:"cap_bnd"`
	CapAmb     uint64    `msgpack:"cap_amb"`
	Securebits uint32    `msgpack:"securebits"`
	NoNewPrivs bool      `msgpack:"no_new_privs"`
}

// Rlimit is one resource limit.
type Rlimit struct {
	Cur uint64 `msgpack:"cur"`
	Max uint64 `msgpack:"max"`
}

// MM holds the mm_struct fields that prctl(PR_SET_MM_MAP) restores.
type MM struct {
	StartCode  uint64 `msgpack:"start_code"`
	EndCode    uint64 `msgpack:"end_code"`
	StartData  uint64 `msgpack:"start_data"`
	EndData    uint64 `msgpack:"end_data"`
	StartBrk   uint64 `msgpack:"start_brk"`
	Brk        uint64 `msgpack:"brk"`
	StartStack uint64 `msgpack:"start_stack"`
	ArgStart   uint64 `msgpack:"arg_start"`
	ArgEnd     uint64 `msgpack:"arg_end"`
	EnvStart   uint64 `msgpack:"env_start"`
	EnvEnd     uint64 `msgpack:"env_end"`
}

// Sigact is one signal's disposition (struct kernel_sigaction).
type Sigact struct {
	Sig      int    `msgpack:"sig"`
	Handler  uint64 `msgpack:"handler"`
	Flags    uint64 `msgpack:"flags"`
	Restorer uint64 `msgpack:"restorer"`
	Mask     uint64 `msgpack:"mask"`
}

// Itimer is one interval timer (struct itimerval, microseconds).
type Itimer struct {
	IntervalSec  int64 `msgpack:"isec"`
	IntervalUsec int64 `msgpack:"iusec"`
	ValueSec     int64 `msgpack:"vsec"`
	ValueUsec    int64 `msgpack:"vusec"`
}

// Siginfo is a raw 128-byte siginfo_t of a pending signal.
type Siginfo []byte

// Thread is the per-thread state.
type Thread struct {
	Tid        int       `msgpack:"tid"`
	Comm       string    `msgpack:"comm"`
	Regs       []uint64  `msgpack:"regs"`   // struct user_regs_struct, in kernel order
	XState     []byte    `msgpack:"xstate"` // NT_X86_XSTATE regset
	Sigmask    uint64    `msgpack:"sigmask"`
	Pending    []Siginfo `msgpack:"pending"`
	RseqAddr   uint64    `msgpack:"rseq_addr"`
	RseqLen    uint32    `msgpack:"rseq_len"`
	RseqSig    uint32    `msgpack:"rseq_sig"`
	RobustList uint64    `msgpack:"robust_list"`
	RobustLen  uint64    `msgpack:"robust_len"`
	TidAddress uint64    `msgpack:"tid_address"`
	AltSP      uint64    `msgpack:"alt_sp"`
	AltFlags   int32     `msgpack:"alt_flags"`
	AltSize    uint64    `msgpack:"alt_size"`
	// Seccomp holds the filters of this thread beyond the process's
	// shared ones (Process.Seccomp), oldest first.
	Seccomp []SeccompFilter `msgpack:"seccomp,omitempty"`
	// Creds, when set, are this thread's own credentials, which differ
	// from the process's (a thread that changed its ids by a raw
	// setresuid: credentials are per thread in the kernel).
	Creds *Creds `msgpack:"creds,omitempty"`
}

// VMAKind says how a memory area is rebuilt.
type VMAKind uint8

const (
	VMAAnon       VMAKind = 1 // anonymous private (heap, stack, mmap(MAP_ANONYMOUS))
	VMAFile       VMAKind = 2 // file mapping, private or shared
	VMASharedAnon VMAKind = 3 // MAP_SHARED|MAP_ANONYMOUS
	VMAVdso       VMAKind = 4 // [vdso]
	VMAVvar       VMAKind = 5 // [vvar]
	VMAVvarVclock VMAKind = 6 // [vvar_vclock]
)

func (k VMAKind) String() string {
	switch k {
	case VMAAnon:
		return "anon"
	case VMAFile:
		return "file"
	case VMASharedAnon:
		return "shared-anon"
	case VMAVdso:
		return "vdso"
	case VMAVvar:
		return "vvar"
	case VMAVvarVclock:
		return "vvar_vclock"
	}
	return "unknown"
}

// Kernel reports whether the area is created by the kernel (vdso and vvar)
// and only moved, never mapped, on restore.
func (k VMAKind) Kernel() bool { return k == VMAVdso || k == VMAVvar || k == VMAVvarVclock }

// VMA is one memory mapping. Its contents, where saved, follow in Pages
// records after all VMA records.
type VMA struct {
	Start   uint64  `msgpack:"start"`
	End     uint64  `msgpack:"end"`
	Prot    uint32  `msgpack:"prot"` // PROT_*
	Shared  bool    `msgpack:"shared"`
	Kind    VMAKind `msgpack:"kind"`
	Name    string  `msgpack:"name"` // path, or [heap], [stack], [vdso]...
	Offset  uint64  `msgpack:"offset"`
	VmFlags string  `msgpack:"vmflags"` // /proc/PID/smaps VmFlags, e.g. "rd wr mr mw me gd ac"
	// File identity checked on restore (file mappings only).
	FileSize  int64 `msgpack:"file_size"`
	FileMtime int64 `msgpack:"file_mtime"` // unix nanoseconds
	// Shm identifies the shared memory object of a VMASharedAnon area in a
	// tree snapshot (its inode): areas with the same Shm share their pages,
	// which are saved only with the first area that maps the object.
	Shm uint64 `msgpack:"shm,omitempty"`
	// Content is the area's bytes for kernel areas that are compared rather
	// than written (the vdso).
	Content []byte `msgpack:"content,omitempty"`
	// Object, for a VMAFile area, is the File record of a file that has
	// no path to map it by (a memfd, a deleted file): the area maps it.
	Object uint64 `msgpack:"object,omitempty"`

	// InParent, in a tree member forked from its parent once the
	// parent's memory is built (TreeProc.Cow), are the page ranges
	// [start, end) of this private anonymous area that were its parent's
	// very pages (one physical page, copy-on-write since a fork), at the
	// same address in an area of the parent: no pages records carry them,
	// and the fork shares them again.
	InParent [][2]uint64 `msgpack:"in_parent,omitempty"`
}

// FileKind says how a File is made again.
type FileKind uint8

const (
	// FileMemfd is a memfd, made again by memfd_create with its name.
	FileMemfd FileKind = 1
	// FileDeleted is a regular file deleted while open or mapped, made
	// again as an unnamed file (O_TMPFILE) in its directory.
	FileDeleted FileKind = 2
	// FileSysV is a System V shared memory segment, attached by areas
	// only; it keeps its key and id.
	FileSysV FileKind = 3
)

// File is a file that only its holders can reach (a memfd, a deleted
// file), saved with its contents: the areas (VMA.Object) and fds
// (FD.Object) that hold it name it by ID. Its first record carries what
// it is and its first chunk of data (Off 0); further records of the same
// ID carry only the following chunks, in order. Chunks that are all
// zeros are left out (the file reads zeros there).
type File struct {
	ID    uint64   `msgpack:"id"`
	Kind  FileKind `msgpack:"kind,omitempty"`
	Name  string   `msgpack:"name,omitempty"`  // memfd name, the deleted file's path, SYSV<key>
	Size  int64    `msgpack:"size,omitempty"`  // length
	Mode  uint32   `msgpack:"mode,omitempty"`  // st_mode
	Seals int      `msgpack:"seals,omitempty"` // F_SEAL_* of a memfd
	// A System V segment's key, id, owner, and whether it was marked for
	// removal (IPC_RMID: it goes when its last attachment does).
	Key     int32  `msgpack:"key,omitempty"`
	ShmID   int    `msgpack:"shmid,omitempty"`
	Uid     uint32 `msgpack:"uid,omitempty"`
	Gid     uint32 `msgpack:"gid,omitempty"`
	Removed bool   `msgpack:"removed,omitempty"`
	Off     int64  `msgpack:"off"`
	Data    []byte `msgpack:"data,omitempty"`
}

// FileChunk bounds the data of one File record.
const FileChunk = 512 << 10

// MaxFileSize bounds a File's length.
const MaxFileSize = 1 << 40

// Len is the size of the area in bytes.
func (v *VMA) Len() uint64 { return v.End - v.Start }

// GrowsDown reports whether the area is a stack that grows down.
func (v *VMA) GrowsDown() bool { return hasFlag(v.VmFlags, "gd") }

func hasFlag(flags, f string) bool {
	for i := 0; i+2 <= len(flags); i += 3 {
		if flags[i:i+2] == f {
			return true
		}
	}
	return false
}

// FDKind says how a file descriptor is rebuilt.
type FDKind uint8

const (
	// FDFile is a regular file, directory or device reopened by path.
	FDFile FDKind = 1
	// FDInherit is a terminal, pipe or socket at fd 0-2 that led outside
	// the process; it is connected to the restorer's own fd of that number.
	FDInherit FDKind = 2
	// FDEventfd is an eventfd, recreated with its counter.
	FDEventfd FDKind = 3
	// FDEpoll is an epoll instance, recreated with its registrations.
	FDEpoll FDKind = 4
	// FDPipe is one end of a pipe whose read and write ends are both held
	// inside a tree snapshot; the pipe is recreated with its buffered data.
	FDPipe FDKind = 5
	// FDListen is a listening TCP socket, re-created and bound to its
	// address (IP_FREEBIND: the address may arrive later, a virtual IP).
	FDListen FDKind = 6
	// FDTCP is an established TCP connection, rebuilt with TCP_REPAIR:
	// the same addresses, sequence numbers, queues, window and options.
	FDTCP FDKind = 7
	// FDUDP is a UDP socket, re-created, bound and connected again; the
	// datagrams queued in it are not carried.
	FDUDP FDKind = 8
	// FDTCPNew is a TCP socket never connected and not listening, bound
	// or not: made again with its options (and address). Its UDP field
	// holds its family, address and options, and no peer.
	FDTCPNew FDKind = 9

	// Anonymous inodes (numbered apart from the socket kinds).

	// FDTimerfd is a timerfd, re-armed with its remaining time, interval
	// and unread expirations (those that fell while frozen added).
	FDTimerfd FDKind = 16
	// FDSignalfd is a signalfd, recreated with its mask.
	FDSignalfd FDKind = 17
	// FDInotify is an inotify instance, its watches re-added by path with
	// their masks and descriptors; events queued when frozen are dropped.
	FDInotify FDKind = 18
	// FDFanotify is a fanotify group, its marks re-added by path (inode
	// marks), mount or filesystem; queued events are dropped.
	FDFanotify FDKind = 19

	// Unix sockets (numbered apart from the others).

	// FDUnix is a unix socket whose peer the snapshot holds too (a
	// socketpair): both ends are made again as one pair, with the
	// messages queued in each.
	FDUnix FDKind = 24
	// FDPipeOut is one end of a pipe (or FIFO) whose other end is
	// outside the process (or tree), beyond fds 0-2: restored as a pipe
	// whose far end is closed, the bytes a read end had buffered kept,
	// unless the restorer is given an fd to put there instead.
	FDPipeOut FDKind = 25
	// FDPtyMaster and FDPtySlave are the two sides of a pseudo-terminal
	// whose master the process (or tree) holds: made again as a new pty
	// (with the same index when it is free), its terminal settings and
	// window size set.
	FDPtyMaster FDKind = 26
	FDPtySlave  FDKind = 27
)

// Pty is a pseudo-terminal (FDPtyMaster, FDPtySlave): its index
// (/dev/pts/N), the terminal's settings and window size, whether it is
// locked (TIOCSPTLCK) or in packet mode (TIOCPKT); for a slave, whether
// it was the process's controlling terminal and the terminal's
// foreground process group then.
type Pty struct {
	Index   int      `msgpack:"index"`
	Termios *Termios `msgpack:"termios,omitempty"`
	Rows    uint16   `msgpack:"rows,omitempty"`
	Cols    uint16   `msgpack:"cols,omitempty"`
	Locked  bool     `msgpack:"locked,omitempty"`
	Packet  bool     `msgpack:"packet,omitempty"`
	Ctty    bool     `msgpack:"ctty,omitempty"`
	Tpgid   int      `msgpack:"tpgid,omitempty"`
}

// Termios is struct termios (TCGETS).
type Termios struct {
	Iflag  uint32 `msgpack:"iflag"`
	Oflag  uint32 `msgpack:"oflag"`
	Cflag  uint32 `msgpack:"cflag"`
	Lflag  uint32 `msgpack:"lflag"`
	Line   uint8  `msgpack:"line"`
	Cc     []byte `msgpack:"cc"` // 19 bytes
	Ispeed uint32 `msgpack:"ispeed"`
	Ospeed uint32 `msgpack:"ospeed"`
}

// MaxPtyIndex bounds a pty's index (the kernel's default
// /proc/sys/kernel/pty/max is 4096).
const MaxPtyIndex = 1 << 20

// UnixSocket is one end of a connected unix socket whose other end the
// process holds too: ID and Peer are the two ends' inodes when frozen
// (sock_diag's UNIX_DIAG_PEER), which pair the two records. Queue holds
// what was received and not yet read, one entry a message (a stream
// socket's bytes in one entry, or one for each run that carried fds);
// Shutdown is the end's sk_shutdown
// (1 receiving, 2 sending shut down).
//
// A socket with no peer that is not listening is unbound, or bound to
// Name (with Mode, Uid, Gid), and has no queue.
//
// A listening socket (Listen) has no peer and no queue: it is bound
// again to Name (an absolute path, or an abstract name starting with
// "@") when the process starts; a path's socket file gets Mode, Uid and
// Gid.
type UnixSocket struct {
	Type     int      `msgpack:"type"` // SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
	ID       uint64   `msgpack:"id"`
	Peer     uint64   `msgpack:"peer"`
	Queue    [][]byte `msgpack:"queue,omitempty"`
	Shutdown int      `msgpack:"shutdown,omitempty"`
	// Rights, parallel to Queue, are the fds of the process a message
	// carries (SCM_RIGHTS), by their numbers in the process.
	Rights [][]int `msgpack:"rights,omitempty"`
	// RightsFrom, in a tree, parallel to Rights, names who holds each
	// of those fds: 0 the process itself, else the saved PID of
	// another member (the fd number is then that member's). Absent
	// when every fd is the process's own. A reader that does not know
	// it refuses queued fds in a tree.
	RightsFrom [][]int `msgpack:"rights_from,omitempty"`
	Listen     bool    `msgpack:"listen,omitempty"`
	// SndBuf is SO_SNDBUF as getsockopt reports it (twice what was
	// set): a pair's queue is charged to the sending end's buffer.
	SndBuf int `msgpack:"sndbuf,omitempty"`
	// Connect, for a socket whose peer was outside (pfreeze
	// -unix-reconnect), is the peer's name (a path, or "@" and an
	// abstract name): the copy connects to it again when it starts.
	Connect string `msgpack:"connect,omitempty"`
	// Handover, for a connected socket whose peer is outside the frozen
	// process (or tree), names where pthaw takes the very socket from:
	// the original, held frozen on this host until the copy is built
	// (pfreeze -halt to a listening pthaw). Nothing else is recorded of
	// it: its queues and state stay in the socket.
	Handover *UnixHandover `msgpack:"handover,omitempty"`
	Name     string        `msgpack:"name,omitempty"`
	Mode     uint32        `msgpack:"mode,omitempty"`
	Uid      uint32        `msgpack:"uid,omitempty"`
	Gid      uint32        `msgpack:"gid,omitempty"`
	// PeerClosed: a connected stream or seqpacket socket whose peer was
	// closed (Peer 0): Queue is what the peer sent before; reads return
	// it, then the end of the stream.
	PeerClosed bool `msgpack:"peer_closed,omitempty"`
	// SO_PASSCRED, SO_PASSSEC.
	PassCred bool `msgpack:"passcred,omitempty"`
	PassSec  bool `msgpack:"passsec,omitempty"`
}

// UnixHandover names a socket held by the original process: its PID and
// fd number on the host, and the network namespace pfreeze ran in (its
// SO_NETNS_COOKIE), which pthaw's must be: another host's is not this
// one's, even when it shares the kernel (a test host).
type UnixHandover struct {
	Pid   int    `msgpack:"pid"`
	Fd    int    `msgpack:"fd"`
	NetNS uint64 `msgpack:"netns"`
}

// MaxUnixQueue bounds the messages queued on one unix socket end.
const MaxUnixQueue = 1 << 16

// Fanotify is the state of a fanotify group (/proc/PID/fdinfo).
type Fanotify struct {
	Flags      uint32         `msgpack:"flags"`       // fanotify_init flags (FAN_CLASS_*, FAN_REPORT_*...)
	EventFlags uint32         `msgpack:"event_flags"` // fanotify_init event_f_flags
	Marks      []FanotifyMark `msgpack:"marks,omitempty"`
}

// FanotifyMark kinds: what a mark's Path names.
const (
	FanMarkInode      = 0
	FanMarkMount      = 1
	FanMarkFilesystem = 2
)

// FanotifyMark is one mark of a fanotify group.
type FanotifyMark struct {
	Kind    int    `msgpack:"kind"`  // FanMarkInode, FanMarkMount, FanMarkFilesystem
	Path    string `msgpack:"path"`  // the inode, or a path on the mount or filesystem
	Flags   uint32 `msgpack:"flags"` // FAN_MARK_* the kernel reports (IGNORED_SURV_MODIFY, EVICTABLE...)
	Mask    uint64 `msgpack:"mask"`
	Ignored uint64 `msgpack:"ignored"`
}

// Timerfd is the state of a timerfd (/proc/PID/fdinfo).
type Timerfd struct {
	Clock        int    `msgpack:"clock"`       // CLOCK_*
	SetFlags     int    `msgpack:"set_flags"`   // TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET
	Ticks        uint64 `msgpack:"ticks"`       // expirations not yet read
	ValueNs      int64  `msgpack:"value_ns"`    // time left to the next expiration; 0: disarmed
	IntervalNs   int64  `msgpack:"interval_ns"` // period; 0: one-shot
	ReadAtUnixNs int64  `msgpack:"read_at_ns"`  // wall clock when read, to count expirations since
}

// InotifyWatch is one watch of an inotify instance.
type InotifyWatch struct {
	Wd   int    `msgpack:"wd"`
	Mask uint32 `msgpack:"mask"`
	Path string `msgpack:"path"`
	// Object, for a watched file deleted since, is its File record (an fd
	// or area of the process holds it): the watch is added on the copy.
	// Path is then the deleted file's old path, for messages.
	Object uint64 `msgpack:"object,omitempty"`
}

// Listener describes a listening TCP socket.
type Listener struct {
	Family    int    `msgpack:"family"`   // AF_INET or AF_INET6
	Protocol  int    `msgpack:"protocol"` // IPPROTO_TCP or IPPROTO_MPTCP (Go's default)
	IP        []byte `msgpack:"ip"`       // 4 or 16 bytes
	Port      int    `msgpack:"port"`
	Zone      uint32 `msgpack:"zone,omitempty"`
	ReuseAddr bool   `msgpack:"reuseaddr,omitempty"`
	ReusePort bool   `msgpack:"reuseport,omitempty"`
	V6Only    bool   `msgpack:"v6only,omitempty"`
}

// SockAddr is an IP socket address.
type SockAddr struct {
	IP   []byte `msgpack:"ip"` // 4 or 16 bytes
	Port int    `msgpack:"port"`
	Zone uint32 `msgpack:"zone,omitempty"`
}

// SockOpts are the socket options carried with a TCP connection or a UDP
// socket. SndBuf and RcvBuf are as getsockopt reports them (twice what
// setsockopt was given).
type SockOpts struct {
	ReuseAddr bool `msgpack:"reuseaddr,omitempty"`
	ReusePort bool `msgpack:"reuseport,omitempty"`
	KeepAlive bool `msgpack:"keepalive,omitempty"`
	Broadcast bool `msgpack:"broadcast,omitempty"`
	V6Only    bool `msgpack:"v6only,omitempty"`
	FreeBind  bool `msgpack:"freebind,omitempty"`
	SndBuf    int  `msgpack:"sndbuf"`
	RcvBuf    int  `msgpack:"rcvbuf"`
	// TCP only.
	NoDelay     bool `msgpack:"nodelay,omitempty"`
	KeepIdle    int  `msgpack:"keepidle,omitempty"`
	KeepIntvl   int  `msgpack:"keepintvl,omitempty"`
	KeepCnt     int  `msgpack:"keepcnt,omitempty"`
	UserTimeout int  `msgpack:"user_timeout,omitempty"`
	// SOL_SOCKET options beyond those above, set when they differ from a
	// new socket's (RcvLowat 1, the others 0 or empty).
	Priority     int    `msgpack:"priority,omitempty"`
	RcvLowat     int    `msgpack:"rcvlowat,omitempty"`
	Mark         int    `msgpack:"mark,omitempty"`
	DontRoute    bool   `msgpack:"dontroute,omitempty"`
	NoCheck      bool   `msgpack:"nocheck,omitempty"`
	OOBInline    bool   `msgpack:"oobinline,omitempty"`
	BindToDevice string `msgpack:"bindtodevice,omitempty"`
}

// TCPWindow is struct tcp_repair_window.
type TCPWindow struct {
	SndWl1    uint32 `msgpack:"snd_wl1"`
	SndWnd    uint32 `msgpack:"snd_wnd"`
	MaxWindow uint32 `msgpack:"max_window"`
	RcvWnd    uint32 `msgpack:"rcv_wnd"`
	RcvWup    uint32 `msgpack:"rcv_wup"`
}

// TCPConn is an established TCP connection read in repair mode
// (TCP_REPAIR): the queues hold the bytes the kernel held, sent and
// unacknowledged or not yet sent (SendQueue, its last Unsent bytes never
// sent), received and not yet read (RecvQueue). SendSeq and RecvSeq are
// the sequence numbers after the last byte of each queue (write_seq and
// rcv_nxt); a FIN sent (TCPFinOut) or received (TCPFinIn) counts one in
// them and none in the queues.
type TCPConn struct {
	Family    int      `msgpack:"family"` // AF_INET or AF_INET6
	Local     SockAddr `msgpack:"local"`
	Peer      SockAddr `msgpack:"peer"`
	State     int      `msgpack:"state"` // TCP_ESTABLISHED
	SendSeq   uint32   `msgpack:"send_seq"`
	RecvSeq   uint32   `msgpack:"recv_seq"`
	SendQueue []byte   `msgpack:"send_queue"`
	Unsent    int      `msgpack:"unsent"`
	RecvQueue []byte   `msgpack:"recv_queue"`
	MSS       uint32   `msgpack:"mss"`     // mss_clamp
	Options   uint8    `msgpack:"options"` // TCPI_OPT_* negotiated
	SndWscale uint8    `msgpack:"snd_wscale"`
	RcvWscale uint8    `msgpack:"rcv_wscale"`
	Timestamp uint32   `msgpack:"timestamp"` // TCP_TIMESTAMP, with TCPI_OPT_TIMESTAMPS
	// TimestampAt is when Timestamp was read (unix nanoseconds): the
	// copy's clock goes on from Timestamp plus the time since, as the
	// original's went on while frozen (it may still have sent segments).
	TimestampAt int64     `msgpack:"timestamp_at"`
	Window      TCPWindow `msgpack:"window"`
	Opts        SockOpts  `msgpack:"opts"`
	// Closed: the connection did not move with the process (its local
	// address stays behind) and was reset on the source; only its
	// addresses are recorded, and the copy gets a socket that reports
	// the connection aborted.
	Closed bool `msgpack:"closed,omitempty"`
}

// UDPSocket is a UDP socket: its bound address (port 0: not bound) and,
// when connected, its peer.
type UDPSocket struct {
	Family int       `msgpack:"family"`
	Local  SockAddr  `msgpack:"local"`
	Peer   *SockAddr `msgpack:"peer,omitempty"`
	Opts   SockOpts  `msgpack:"opts"`
}

// EpollTarget is one registration of an epoll instance.
type EpollTarget struct {
	Fd     int    `msgpack:"fd"`
	Events uint32 `msgpack:"events"`
	Data   uint64 `msgpack:"data"`
	// Via, when set, is the fd that holds the watched file now: the one
	// at Fd was closed (or replaced) since it was added. It is added
	// under Fd all the same, as the kernel keeps it.
	Via *int `msgpack:"via,omitempty"`
}

// FD is one open file descriptor.
type FD struct {
	Fd    int    `msgpack:"fd"`
	Kind  FDKind `msgpack:"kind"`
	Path  string `msgpack:"path"`
	Flags uint32 `msgpack:"flags"` // open flags as in /proc/PID/fdinfo, O_CLOEXEC included
	Pos   int64  `msgpack:"pos"`
	Mode  uint32 `msgpack:"mode"` // st_mode of the file
	// Desc numbers open file descriptions: fds with the same Desc share one
	// (they were dup'ed) and so share offset and status flags.
	Desc int    `msgpack:"desc"`
	What string `msgpack:"what"` // readlink of /proc/PID/fd/N, for messages

	EventCount uint64        `msgpack:"event_count,omitempty"` // FDEventfd
	Semaphore  bool          `msgpack:"semaphore,omitempty"`   // FDEventfd
	Epoll      []EpollTarget `msgpack:"epoll,omitempty"`       // FDEpoll

	// FDPipe: the pipe's identity (its inode when frozen; for a named FIFO,
	// which Path names and which is reopened by it, a hash of its device
	// and inode with the top bit set); which end is in Flags (O_WRONLY: the
	// write end, O_RDWR: both). The first fd record of a pipe in the
	// snapshot carries its capacity and the bytes buffered in it.
	Pipe     uint64 `msgpack:"pipe,omitempty"`
	PipeSize int    `msgpack:"pipe_size,omitempty"`
	PipeData []byte `msgpack:"pipe_data,omitempty"`

	Listen *Listener   `msgpack:"listen,omitempty"` // FDListen
	TCP    *TCPConn    `msgpack:"tcp,omitempty"`    // FDTCP
	UDP    *UDPSocket  `msgpack:"udp,omitempty"`    // FDUDP
	Unix   *UnixSocket `msgpack:"unix,omitempty"`   // FDUnix
	Pty    *Pty        `msgpack:"pty,omitempty"`    // FDPtyMaster, FDPtySlave

	// Object, for an FDFile, is the File record it is reopened from
	// (a memfd, a deleted file).
	Object uint64 `msgpack:"object,omitempty"`

	// Owner and Signal are the open file description's F_GETOWN (a
	// process group negative) and F_GETSIG, read when O_ASYNC is in
	// Flags: whom the kernel signals when I/O is possible, with which
	// signal (0: SIGIO).
	Owner  int `msgpack:"owner,omitempty"`
	Signal int `msgpack:"signal,omitempty"`

	Timer    *Timerfd       `msgpack:"timerfd,omitempty"`  // FDTimerfd
	SigMask  uint64         `msgpack:"sigmask,omitempty"`  // FDSignalfd
	Watches  []InotifyWatch `msgpack:"watches,omitempty"`  // FDInotify
	Fanotify *Fanotify      `msgpack:"fanotify,omitempty"` // FDFanotify
}

// Tree opens the snapshot of a process tree (pfreeze -tree). It lists the
// members in creation order, every parent before its children; their
// records (Process, Thread*, VMA*, Pages*, FD*) follow in the same order.
// A snapshot without a Tree record holds a single process.
type Tree struct {
	Procs []TreeProc `msgpack:"procs"`
}

// TreeProc is one member of a tree: its place (parent, process group,
// session) and, for a zombie, its exit status.
type TreeProc struct {
	Pid        int  `msgpack:"pid"`
	PPid       int  `msgpack:"ppid"` // the root's parent is outside the tree
	Pgid       int  `msgpack:"pgid"`
	Sid        int  `msgpack:"sid"`
	Threads    int  `msgpack:"threads"`
	Zombie     bool `msgpack:"zombie,omitempty"`
	ExitStatus int  `msgpack:"exit_status,omitempty"` // wait status, /proc/PID/stat field 52

	// Cow: the member shares pages with its parent (VMA.InParent), so its
	// stub is forked from its parent's once the parent's memory is
	// built, not before, and so are its descendants' (LateMembers), each
	// from its parent once that is built. Only where nothing else
	// depends on their early existence (MayForkLate): every member of a
	// group or session one of them leads is one of them, after it.
	Cow bool `msgpack:"cow,omitempty"`
}

// End closes a snapshot.
type End struct {
	CRC    uint32 `msgpack:"crc32c"` // CRC-32C of every body byte before this record
	Length uint64 `msgpack:"length"` // number of body bytes before this record
}

// Pages introduces a run of page contents at Addr. Its data (Len bytes)
// follows the record header; readers take it with Decoder.ReadData.
type Pages struct {
	Addr uint64
	Len  uint64
}
