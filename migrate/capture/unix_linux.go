package capture

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/netns"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// Unix sockets are identified as CRIU's sk-unix.c does: sock_diag
// (NETLINK_SOCK_DIAG) reports a socket's type, state, name, peer and
// queue length by its inode. A connected socket whose peer the process
// holds too (a socketpair) is carried with the messages queued in each
// end, read with MSG_PEEK at an advancing SO_PEEK_OFF on pfreeze's
// duplicate, which leaves the queues as they were whatever happens next.
// Anything else (a peer outside the process, a listening or named
// socket) is refused by name.

// sock_diag's unix attributes and show flags (linux/unix_diag.h).
const (
	unixDiagName     = 0
	unixDiagVFS      = 1
	unixDiagPeer     = 2
	unixDiagRQLen    = 4
	unixDiagShutdown = 6

	udiagShowName  = 0x01
	udiagShowVFS   = 0x02
	udiagShowPeer  = 0x04
	udiagShowRQLen = 0x10
)

// unixDiag is what sock_diag reports of one unix socket.
type unixDiag struct {
	typ, state int
	ino, peer  uint64
	name       string // "" unbound; an abstract name starts with "@"
	rqlen      uint32 // a listener's backlog, or the bytes queued
	shutdown   int
	hasPeer    bool
	vfsIno     uint64 // the inode of a path's socket file
	// root is where its holder's paths are reached from here (its
	// /proc/PID/root: a container's mount namespace).
	root string
}

// diagUnix asks sock_diag about the unix socket with inode ino, held by
// pid: in pid's network namespace, the only one whose sock_diag knows it.
func diagUnix(pid int, ino uint64) (*unixDiag, error) {
	s, err := diagSocket(pid)
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	defer unix.Close(s)
	// struct nlmsghdr, then struct unix_diag_req: family, protocol, pad,
	// states, ino, show, cookie (all ones: not checked).
	req := make([]byte, 16+24)
	binary.LittleEndian.PutUint32(req[0:], uint32(len(req)))
	binary.LittleEndian.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.LittleEndian.PutUint16(req[6:], unix.NLM_F_REQUEST)
	binary.LittleEndian.PutUint32(req[8:], 1)
	req[16] = unix.AF_UNIX
	binary.LittleEndian.PutUint32(req[20:], ^uint32(0))
	binary.LittleEndian.PutUint32(req[24:], uint32(ino))
	binary.LittleEndian.PutUint32(req[28:], udiagShowName|udiagShowVFS|udiagShowPeer|udiagShowRQLen)
	binary.LittleEndian.PutUint32(req[32:], ^uint32(0))
	binary.LittleEndian.PutUint32(req[36:], ^uint32(0))
	if err := unix.Sendto(s, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sock_diag: send: %w", err)
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(s, buf, 0)
	if err != nil {
		return nil, fmt.Errorf("sock_diag: receive: %w", err)
	}
	// One answer: struct nlmsghdr (length, type...), then its data.
	if n < 16 || int(binary.LittleEndian.Uint32(buf)) > n || binary.LittleEndian.Uint32(buf) < 16 {
		return nil, fmt.Errorf("sock_diag: malformed answer")
	}
	data := buf[16:binary.LittleEndian.Uint32(buf)]
	if binary.LittleEndian.Uint16(buf[4:]) == unix.NLMSG_ERROR {
		if len(data) >= 4 {
			if e := int32(binary.LittleEndian.Uint32(data)); e < 0 {
				return nil, fmt.Errorf("sock_diag: socket %d: %w", ino, unix.Errno(-e))
			}
		}
		return nil, fmt.Errorf("sock_diag: socket %d: error answer", ino)
	}
	// struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
	if len(data) < 16 {
		return nil, fmt.Errorf("sock_diag: short answer")
	}
	d := &unixDiag{typ: int(data[1]), state: int(data[2]), ino: uint64(binary.LittleEndian.Uint32(data[4:])), root: procfs.Path(pid, "root")}
	for b := data[16:]; len(b) >= 4; {
		l := int(binary.LittleEndian.Uint16(b))
		if l < 4 || l > len(b) {
			break
		}
		typ, val := binary.LittleEndian.Uint16(b[2:]), b[4:l]
		switch typ {
		case unixDiagName:
			if len(val) > 0 && val[0] == 0 {
				d.name = "@" + string(val[1:])
			} else {
				d.name = strings.TrimRight(string(val), "\x00")
			}
		case unixDiagVFS:
			if len(val) >= 4 {
				d.vfsIno = uint64(binary.LittleEndian.Uint32(val))
			}
		case unixDiagPeer:
			if len(val) >= 4 {
				d.peer, d.hasPeer = uint64(binary.LittleEndian.Uint32(val)), true
			}
		case unixDiagRQLen:
			if len(val) >= 4 {
				d.rqlen = binary.LittleEndian.Uint32(val)
			}
		case unixDiagShutdown:
			if len(val) >= 1 {
				d.shutdown = int(val[0])
			}
		}
		if l = (l + 3) &^ 3; l > len(b) {
			break
		}
		b = b[l:]
	}
	return d, nil
}

// socketInodes returns the inodes of the sockets pid holds.
func socketInodes(pid int) (map[uint64]bool, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	own := map[uint64]bool{}
	for _, e := range ents {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64); err == nil {
			own[ino] = true
		}
	}
	return own, nil
}

var unixTypes = map[int]string{unix.SOCK_STREAM: "stream", unix.SOCK_DGRAM: "datagram", unix.SOCK_SEQPACKET: "seqpacket"}

// describeUnix records the unix socket held (h) at pid's fd: one end of a
// connected pair whose other end pid holds too. Anything else is refused
// with what it is and why.
func describeUnix(pid int, h *heldSocket, socks *sockets, rec *image.FD) error {
	var st unix.Stat_t
	if err := unix.Fstat(h.fd, &st); err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	d, err := diagUnix(pid, st.Ino)
	if err != nil {
		return err
	}
	typ := unixTypes[d.typ]
	if typ == "" {
		return fmt.Errorf("unix socket of type %d is not supported", d.typ)
	}
	what := fmt.Sprintf("unix %s socket", typ)
	if d.name != "" {
		what += fmt.Sprintf(" %q", d.name)
	}
	if d.state == unixTCPListen {
		return describeUnixListener(d, what, rec)
	}
	if d.hasPeer && d.peer == 0 && (d.typ == unix.SOCK_STREAM || d.typ == unix.SOCK_SEQPACKET) {
		// Connected, and its peer closed since: what the peer sent
		// before is still to be read.
		queue, rights, _, err := peekUnix(pid, socks.members, h.fd, d.typ, d.shutdown&1 != 0)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if rights != nil {
			return fmt.Errorf("%s (its peer closed): file descriptors queued in it (SCM_RIGHTS) are not carried yet", what)
		}
		rec.Kind = image.FDUnix
		rec.Unix = &image.UnixSocket{Type: d.typ, ID: d.ino, Queue: queue, Shutdown: d.shutdown, PeerClosed: true}
		return nil
	}
	if !d.hasPeer || d.peer == 0 {
		return describeUnixUnconnected(d, what, rec)
	}
	if socks.unixOwn == nil {
		if socks.unixOwn, err = socketInodes(pid); err != nil {
			return fmt.Errorf("fds: %w", err)
		}
	}
	if !socks.unixOwn[d.peer] {
		peer := fmt.Sprintf("socket:[%d]", d.peer)
		pd, err := diagUnix(pid, d.peer)
		if err == nil && pd.name != "" {
			peer = fmt.Sprintf("%q (%s)", pd.name, peer)
		}
		if socks.reconnect {
			return reconnectUnix(d, pd, what, peer, h, socks, rec)
		}
		if socks.handover {
			return handOverUnix(pid, d, what, peer, h, socks, rec)
		}
		return fmt.Errorf("%s is connected to %s outside the frozen process (or tree): not carried (pfreeze -unix-reconnect connects the copy to it again; pfreeze -halt to a listening pthaw on this host hands the connection itself over)", what, peer)
	}
	if d.name != "" {
		// An accepted connection carries its listener's name, a client
		// the name it bound: the pair is made again by socketpair,
		// without names.
		socks.say("fd %d (%s) is connected to a socket of the process: carried as a pair without its name (getsockname and getpeername in the copy return none)", h.target, what)
	}
	queue, rights, from, err := peekUnix(pid, socks.members, h.fd, d.typ, d.shutdown&1 != 0)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	rec.Kind = image.FDUnix
	sndbuf, _ := unix.GetsockoptInt(h.fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	rec.Unix = &image.UnixSocket{Type: d.typ, ID: d.ino, Peer: d.peer, Queue: queue, Rights: rights, RightsFrom: from, Shutdown: d.shutdown, SndBuf: sndbuf}
	return nil
}

// treeMember is a member of a frozen tree, for a queued fd (SCM_RIGHTS)
// held by another member than the socket's.
type treeMember struct {
	pid   int // ours
	saved int // as the snapshot names it
}

// unixTCPListen is the state sock_diag reports for a listening unix
// socket (TCP_LISTEN).
const unixTCPListen = 10

// peekUnix reads what is queued on the socket s of pid without consuming
// it: MSG_PEEK at an advancing SO_PEEK_OFF, which is put back after. A
// stream's bytes come as one entry (one for each run that carried fds),
// every datagram or packet as one. A message's fds (SCM_RIGHTS) are
// recorded as the fds of pid that hold the same files, or, in a tree,
// of another member (members), whose saved PID from names (nil when
// every fd is pid's own); one nobody holds is refused. rcvShut says the
// receiving side is shut down (its peer closed or shut down writing):
// then reads end with 0 bytes, which for a seqpacket socket is taken as
// the end, not as an empty packet (empty packets queued last before
// that end are not carried).
func peekUnix(pid int, members []treeMember, s, typ int, rcvShut bool) (queue [][]byte, rights, from [][]int, err error) {
	old, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_PEEK_OFF)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("SO_PEEK_OFF: %w", err)
	}
	if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_PEEK_OFF, 0); err != nil {
		return nil, nil, nil, fmt.Errorf("SO_PEEK_OFF: %w", err)
	}
	defer unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_PEEK_OFF, old)
	var stream []byte
	anyRights, anyFrom := false, false
	buf := make([]byte, 1<<20)
	oob := make([]byte, unix.CmsgSpace(253*4))
	for total := 0; ; {
		n, oobn, flags, _, err := unix.Recvmsg(s, buf, oob, unix.MSG_PEEK|unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			return nil, nil, nil, fmt.Errorf("peek at its queue: %w", err)
		}
		var carried, holders []int
		if oobn > 0 {
			if carried, holders, err = heldRights(pid, members, oob[:oobn]); err != nil {
				return nil, nil, nil, err
			}
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			return nil, nil, nil, fmt.Errorf("a queued message larger than %d bytes or with more than 253 fds", len(buf))
		}
		if n == 0 && (typ == unix.SOCK_STREAM || (typ == unix.SOCK_SEQPACKET && rcvShut && carried == nil)) {
			break // the end of the stream: the peer shut down
		}
		if typ == unix.SOCK_STREAM && carried == nil {
			stream = append(stream, buf[:n]...)
		} else {
			if len(stream) > 0 {
				queue, rights, from = append(queue, stream), append(rights, nil), append(from, nil)
				stream = nil
			}
			queue, rights, from = append(queue, append([]byte(nil), buf[:n]...)), append(rights, carried), append(from, holders)
			anyRights = anyRights || carried != nil
			for _, h := range holders {
				anyFrom = anyFrom || h != 0
			}
		}
		if total += n; total > image.MaxSockQueue || len(queue) > image.MaxUnixQueue {
			return nil, nil, nil, fmt.Errorf("more than %d bytes or %d messages queued", image.MaxSockQueue, image.MaxUnixQueue)
		}
	}
	if len(stream) > 0 {
		queue, rights, from = append(queue, stream), append(rights, nil), append(from, nil)
	}
	if !anyRights {
		rights = nil
	}
	if !anyFrom {
		from = nil
	}
	return queue, rights, from, nil
}

// heldRights returns, for each fd an SCM_RIGHTS message in oob gave us
// (which it closes), the fd of pid that holds the same open file, or
// else of another member of its tree (members), and who holds it: 0 for
// pid itself, else the member's saved PID.
func heldRights(pid int, members []treeMember, oob []byte) (held, from []int, err error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, nil, fmt.Errorf("control message: %w", err)
	}
	var got []int
	for i := range msgs {
		if fds, err := unix.ParseUnixRights(&msgs[i]); err == nil {
			got = append(got, fds...)
		}
	}
	defer func() {
		for _, fd := range got {
			unix.Close(fd)
		}
	}()
	if len(got) == 0 {
		return nil, nil, nil
	}
	// pid first: a file it holds itself is taken from it.
	holders := []treeMember{{pid: pid}}
	for _, m := range members {
		if m.pid != pid {
			holders = append(holders, m)
		}
	}
	infos := make([][]procfs.FDInfo, len(holders))
	for _, fd := range got {
		found, by := -1, 0
		for i := 0; i < len(holders) && found < 0; i++ {
			if infos[i] == nil {
				if infos[i], err = procfs.FDs(holders[i].pid); err != nil {
					return nil, nil, fmt.Errorf("pid %d: fds: %w", holders[i].pid, err)
				}
			}
			for _, fi := range infos[i] {
				const kcmpFile = 0
				r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(os.Getpid()), uintptr(holders[i].pid), kcmpFile, uintptr(fd), uintptr(fi.Fd), 0)
				if e == 0 && r == 0 {
					found, by = fi.Fd, holders[i].saved
					break
				}
			}
		}
		if found < 0 {
			link, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
			who := "the process"
			if len(members) > 0 {
				who = "any process of the tree"
			}
			return nil, nil, fmt.Errorf("a file descriptor queued in it (SCM_RIGHTS, %s) is not open in %s: not carried", link, who)
		}
		held, from = append(held, found), append(from, by)
	}
	return held, from, nil
}

// describeUnixUnconnected records a unix socket neither connected nor
// listening: unbound, or bound to a name (a datagram socket others send
// to). Datagrams queued in it came from senders whose addresses a
// restore cannot give them again: such a socket is refused.
func describeUnixUnconnected(d *unixDiag, what string, rec *image.FD) error {
	if d.rqlen > 0 {
		return fmt.Errorf("%s (not connected) has messages queued from other sockets, which are not carried: try again once the process has read them (it runs on)", what)
	}
	if d.typ == unix.SOCK_STREAM || d.typ == unix.SOCK_SEQPACKET {
		if d.state != 7 && d.state != 0 { // TCP_CLOSE: never connected
			return fmt.Errorf("%s in state %d is not supported", what, d.state)
		}
	}
	if err := describeUnixListener(d, what, rec); err != nil {
		if d.name != "" {
			return err
		}
		rec.Kind, rec.Unix = image.FDUnix, &image.UnixSocket{Type: d.typ, ID: d.ino}
	}
	rec.Unix.Listen = false
	return nil
}

// describeUnixListener records a listening unix socket: its name (an
// absolute path, or an abstract name) and its socket file's mode and
// owner. One with connections not yet accepted is refused: they would be
// lost with the original, which, resumed, accepts them.
func describeUnixListener(d *unixDiag, what string, rec *image.FD) error {
	if d.rqlen > 0 {
		return fmt.Errorf("%s has %d connections not yet accepted, which would be lost: try again once the process has accepted them (it runs on)", what, d.rqlen)
	}
	u := &image.UnixSocket{Type: d.typ, ID: d.ino, Listen: true, Name: d.name}
	switch {
	case strings.HasPrefix(d.name, "@"):
	case strings.HasPrefix(d.name, "/"):
		// The file must still be this socket's: a restore binds the
		// name again.
		var st unix.Stat_t
		if err := unix.Lstat(d.root+d.name, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Ino != d.vfsIno {
			return fmt.Errorf("%s: its path no longer names its socket file", what)
		}
		u.Mode, u.Uid, u.Gid = st.Mode&0o7777, st.Uid, st.Gid
	default:
		return fmt.Errorf("%s: a listening unix socket bound to a relative path is not supported", what)
	}
	rec.Kind, rec.Unix = image.FDUnix, u
	return nil
}

// reconnectUnix records a unix socket connected to a peer outside the
// frozen set (pd) as one the copy connects again to the peer's name
// (pfreeze -unix-reconnect, CRIU's --ext-unix-sk). What the peer sent and
// the process has not read would be lost: such a socket is refused, as
// is one whose peer has no name to connect to, or that has a name of
// its own.
func reconnectUnix(d, pd *unixDiag, what, peer string, h *heldSocket, socks *sockets, rec *image.FD) error {
	if pd == nil || pd.name == "" || (pd.name[0] != '/' && pd.name[0] != '@') {
		return fmt.Errorf("%s is connected to %s outside the frozen process, which has no name to connect to again", what, peer)
	}
	if d.name != "" {
		return fmt.Errorf("%s has a name of its own: it cannot be connected again as it was", what)
	}
	var q int
	var err error
	if d.typ == unix.SOCK_STREAM || d.typ == unix.SOCK_SEQPACKET {
		q, err = unix.IoctlGetInt(h.fd, unix.TIOCINQ)
	} else {
		var queue [][]byte
		queue, _, _, err = peekUnix(0, nil, h.fd, d.typ, d.shutdown&1 != 0)
		q = len(queue)
	}
	if err != nil || q > 0 {
		return fmt.Errorf("%s connected to %s has %d bytes or messages from its peer not yet read (%v), which a new connection would lose: try again once the process has read them (it runs on)", what, peer, q, err)
	}
	rec.Kind = image.FDUnix
	rec.Unix = &image.UnixSocket{Type: d.typ, ID: d.ino, Connect: pd.name}
	socks.say("fd %d (%s) is connected to %s outside the process: the copy connects to it again", h.target, what, peer)
	return nil
}

// handOverUnix records a unix socket connected to a peer outside the
// frozen set as one pthaw takes from the original (pid) itself and gives
// the copy: the same socket, so the peer keeps its connection, with
// whatever is queued either way. It can be done only on this host and
// while the original is held, which a -halt move to a receiver that
// builds the copy before the original is killed guarantees
// (FreezeOptions.UnixHandover).
func handOverUnix(pid int, d *unixDiag, what, peer string, h *heldSocket, socks *sockets, rec *image.FD) error {
	cookie, err := netns.Cookie()
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	rec.Kind = image.FDUnix
	rec.Unix = &image.UnixSocket{Type: d.typ, ID: d.ino, Handover: &image.UnixHandover{Pid: pid, Fd: h.target, NetNS: cookie}}
	socks.say("fd %d (%s) is connected to %s outside the process: the copy takes over this connection from the original, held until then (on this host only)", h.target, what, peer)
	return nil
}
