package scheduler

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalid marks a spec or command the state refuses: a field out of its
// range or over its limit. The API answers it with 400.
var ErrInvalid = errors.New("invalid")

// MaxID is the highest uid or gid a workload may ask for: 2^32−2, since
// (uid_t)−1 means "unchanged" to setresuid and friends.
const MaxID = 1<<32 - 2

// CheckID range-checks a uid or gid before it becomes a uint32, so that
// 2^32 or −7 can never wrap to root.
func CheckID(field string, v int64) (uint32, error) {
	if v < 0 || v > MaxID {
		return 0, fmt.Errorf("%s %d: out of range 0..%d: %w", field, v, int64(MaxID), ErrInvalid)
	}
	return uint32(v), nil
}

// MaxUserName bounds user and group names (useradd allows 32).
const MaxUserName = 256

// checkName checks a user or group name: no ':' (the passwd separator),
// no control characters, not empty when given, not a number (a numeric
// name would be ambiguous with an id).
func checkName(field, v string) error {
	if v == "" {
		return nil
	}
	if len(v) > MaxUserName {
		return fmt.Errorf("%s: %d bytes, limit %d: %w", field, len(v), MaxUserName, ErrInvalid)
	}
	if strings.ContainsAny(v, ":/") || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("%s %q: not a user or group name: %w", field, v, ErrInvalid)
	}
	return nil
}

// ValidateWorkload checks a workload spec against every limit. Both the API
// (before proposing) and the FSM (when applying workload-create) call it, so
// a raft entry can never carry a workload the state would not accept.
func ValidateWorkload(w *Workload) error {
	return validateCred(w)
}

// validateCred checks a workload's credentials: uid/gid −1 (not given) or
// 0..MaxID, names well-formed, not both a uid and a user name.
func validateCred(w *Workload) error {
	for _, f := range []struct {
		name string
		v    int
	}{{"uid", w.UID}, {"gid", w.GID}} {
		if f.v != -1 {
			if _, err := CheckID(f.name, int64(f.v)); err != nil {
				return err
			}
		}
	}
	if err := checkName("user", w.User); err != nil {
		return err
	}
	if err := checkName("group", w.Group); err != nil {
		return err
	}
	if w.User != "" && w.UID != -1 {
		return fmt.Errorf("uid %d and user %q: give one: %w", w.UID, w.User, ErrInvalid)
	}
	if w.Group != "" && w.GID != -1 {
		return fmt.Errorf("gid %d and group %q: give one: %w", w.GID, w.Group, ErrInvalid)
	}
	return nil
}
