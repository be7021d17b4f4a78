package node

import (
	"fmt"
	"os"
	"os/user"
	"slices"
	"strconv"
	"syscall"

	"github.com/pcluster/pcluster/scheduler"
)

// credential returns exactly the credentials workload w runs with, resolved
// in this host's user database, the way `runuser -u USER [-g GROUP]` does:
//
//   - the user: w.User (a name), else w.UID, else the agent's own uid;
//   - the group: w.Group (a name), else w.GID, else the user's primary group
//     from passwd; a uid with no passwd entry needs a group (refused here
//     with one line), except the agent's own uid, which keeps its gid;
//   - the supplementary groups: the user's groups from the group database
//     (its primary group replaced by the chosen one), or none when the uid
//     has no passwd entry. Never the agent's own groups.
//
// It returns nil when the agent is not root and nothing was asked: the
// workload then runs exactly as the agent (which could not change it).
func credential(w scheduler.Workload, node string) (*syscall.Credential, error) {
	// Only −1 means "not given". The state holds whatever was committed
	// (an older pclusterd accepted −5): any other value is range-checked
	// below, never taken for "not given", which would run it as the agent.
	asked := w.UID != -1 || w.GID != -1 || w.User != "" || w.Group != ""
	if !asked && os.Geteuid() != 0 {
		return nil, nil
	}
	var u *user.User
	var uid uint32
	var err error
	switch {
	case w.User != "":
		if u, err = user.Lookup(w.User); err != nil {
			return nil, fmt.Errorf("user %q on node %s: %w", w.User, node, err)
		}
		if uid, err = parseID(u.Uid); err != nil {
			return nil, fmt.Errorf("user %q on node %s: uid %q: %w", w.User, node, u.Uid, err)
		}
	case w.UID != -1:
		if uid, err = scheduler.CheckID("uid", int64(w.UID)); err != nil {
			return nil, err
		}
		u, _ = user.LookupId(strconv.FormatUint(uint64(uid), 10)) // nil: no passwd entry
	default:
		uid = uint32(os.Geteuid())
		u, _ = user.LookupId(strconv.FormatUint(uint64(uid), 10))
	}

	var gid uint32
	groupAsked := true
	switch {
	case w.Group != "":
		g, err := user.LookupGroup(w.Group)
		if err != nil {
			return nil, fmt.Errorf("group %q on node %s: %w", w.Group, node, err)
		}
		if gid, err = parseID(g.Gid); err != nil {
			return nil, fmt.Errorf("group %q on node %s: gid %q: %w", w.Group, node, g.Gid, err)
		}
	case w.GID != -1:
		if gid, err = scheduler.CheckID("gid", int64(w.GID)); err != nil {
			return nil, err
		}
	default:
		groupAsked = false
		switch {
		case u != nil:
			if gid, err = parseID(u.Gid); err != nil {
				return nil, fmt.Errorf("uid %d on node %s: primary gid %q: %w", uid, node, u.Gid, err)
			}
		case w.User == "" && w.UID == -1: // the agent's own uid, not in passwd
			gid = uint32(os.Getegid())
		default:
			return nil, fmt.Errorf("uid %d has no passwd entry on node %s: give a gid (-gid)", uid, node)
		}
	}

	groups := []uint32{}
	if u != nil {
		ids, err := u.GroupIds()
		if err != nil {
			return nil, fmt.Errorf("groups of user %s (uid %d) on node %s: %w", u.Username, uid, node, err)
		}
		for _, s := range ids {
			id, err := parseID(s)
			if err != nil {
				return nil, fmt.Errorf("groups of user %s on node %s: gid %q: %w", u.Username, node, s, err)
			}
			if groupAsked && s == u.Gid {
				id = gid // initgroups(name, gid): the chosen group in place of passwd's
			}
			if !slices.Contains(groups, id) {
				groups = append(groups, id)
			}
		}
	}
	return &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}, nil
}

// parseID parses a uid or gid from the user database.
func parseID(s string) (uint32, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, err
	}
	return scheduler.CheckID("id", n)
}
