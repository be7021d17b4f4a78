package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

// listenSocket creates the local API socket at path with its final mode
// (0600, or 0660 and group gid when gid >= 0) before anyone can reach it.
//
// Why not bind then chmod: between the two any local user may connect (the
// file is created with 0777 &^ umask). Why not umask around bind: umask is
// per process and Go runs other goroutines (raft, gossip, the agent creating
// log files) on other threads at the same moment. So the socket is bound in
// a fresh directory only this user can enter (MkdirTemp makes it 0700, and a
// umask can only remove bits), given its mode and group there, and renamed
// into place: rename is atomic, so the path never names a socket with any
// other mode. The private directory sits beside path so the rename stays on
// one file system.
func listenSocket(path string, gid int) (*net.UnixListener, error) {
	dir, err := os.MkdirTemp(filepath.Dir(path), ".pclusterd-sock-")
	if err != nil {
		return nil, fmt.Errorf("socket %s: private directory: %w", path, err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	// The file is renamed away: the listener must not unlink tmp on Close;
	// Shutdown removes path.
	ln.SetUnlinkOnClose(false)
	mode := os.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
		if err := os.Lchown(tmp, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("socket %s: group %d: %w", path, gid, err)
		}
	}
	if err := os.Chmod(tmp, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return ln, nil
}

// lookupGroup resolves a -socket-group value: a group name or a numeric gid.
func lookupGroup(name string) (int, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		if _, perr := strconv.ParseUint(name, 10, 32); perr != nil {
			return 0, fmt.Errorf("socket group %q: %w", name, err)
		}
		g, err = user.LookupGroupId(name)
		if err != nil {
			return 0, fmt.Errorf("socket group %q: %w", name, err)
		}
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, fmt.Errorf("socket group %q: gid %q: %w", name, g.Gid, err)
	}
	return gid, nil
}

// peerCred is who is at the other end of a unix connection, as the kernel
// recorded it at connect time (SO_PEERCRED, SO_PEERGROUPS).
type peerCred struct {
	pid, uid, gid int
	groups        []int
	err           error // the credentials could not be read: refuse
}

type peerKey struct{}

// peerOf reads the peer credentials of a unix connection. It is the
// socket server's ConnContext: every request on the connection carries them.
func peerOf(ctx context.Context, c net.Conn) context.Context {
	p := &peerCred{pid: -1, uid: -1, gid: -1}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		p.err = fmt.Errorf("not a unix connection (%T)", c)
		return context.WithValue(ctx, peerKey{}, p)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		p.err = err
		return context.WithValue(ctx, peerKey{}, p)
	}
	cerr := rc.Control(func(fd uintptr) {
		u, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			p.err = fmt.Errorf("SO_PEERCRED: %w", err)
			return
		}
		p.pid, p.uid, p.gid = int(u.Pid), int(u.Uid), int(u.Gid)
		p.groups, err = peerGroups(int(fd))
		if err != nil {
			p.err = fmt.Errorf("SO_PEERGROUPS: %w", err)
		}
	})
	if cerr != nil && p.err == nil {
		p.err = cerr
	}
	return context.WithValue(ctx, peerKey{}, p)
}

// peerPolicy says which local peers the socket serves: root, the daemon's
// own uid, and members of group (when >= 0).
type peerPolicy struct {
	uid   int // the daemon's effective uid
	group int // -socket-group, or -1
	name  string
}

// allowed returns nil when p may use the API, or why not.
func (pp peerPolicy) allowed(p *peerCred) error {
	if p == nil {
		return errors.New("no peer credentials")
	}
	if p.err != nil {
		return fmt.Errorf("peer credentials: %w", p.err)
	}
	if p.uid == 0 || p.uid == pp.uid {
		return nil
	}
	if pp.group >= 0 && (p.gid == pp.group || slices.Contains(p.groups, pp.group)) {
		return nil
	}
	who := "root or pclusterd's uid"
	if pp.group >= 0 {
		who = fmt.Sprintf("root, pclusterd's uid or a member of group %s", pp.name)
	}
	return fmt.Errorf("peer uid %d (pid %d) is not %s", p.uid, p.pid, who)
}

// checkPeer refuses, with 403 and one line, every request whose connection
// was opened by a peer the policy does not allow. The socket's file mode
// already keeps others out; this holds even if the file is made reachable
// (a chmod, a bind mount into a container, a directory with looser modes).
func (s *Server) checkPeer(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := r.Context().Value(peerKey{}).(*peerCred)
		if err := s.peers.allowed(p); err != nil {
			s.log.Warn("socket peer refused", "socket", s.cfg.Socket, "err", err)
			writeErr(w, &httpError{http.StatusForbidden, fmt.Errorf("socket %s: %w", s.cfg.Socket, err)})
			return
		}
		h.ServeHTTP(w, r)
	})
}
