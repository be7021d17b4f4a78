package loader

import (
	"os"

	"golang.org/x/sys/unix"
)

// capCheckpointRestore is CAP_CHECKPOINT_RESTORE.
const capCheckpointRestore = 40

// stubAmbientCaps returns the capabilities the stub must keep across its
// exec so that clone3(set_tid) works in it. Root keeps every capability
// across exec anyway; an unprivileged pthaw given the capability with
// setcap passes it on as an ambient capability, which needs it in this
// thread's inheritable set first. The restored process does not keep it:
// an ordinary user's snapshot may hold no capability (checkCreds), so
// setCreds empties every set, and a stub left behind loses it too
// (dropStubCaps). Runs on the tracer thread (capability
// sets are per thread, and the stub is forked from it).
func stubAmbientCaps() []uintptr {
	if os.Getuid() == 0 {
		return nil
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil
	}
	word, bit := capCheckpointRestore/32, uint32(1)<<(capCheckpointRestore%32)
	if data[word].Permitted&bit == 0 {
		return nil
	}
	data[word].Inheritable |= bit
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return nil
	}
	return []uintptr{capCheckpointRestore}
}
