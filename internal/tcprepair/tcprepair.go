// Package tcprepair names the kernel's TCP repair-mode constants that
// golang.org/x/sys/unix does not: the queues TCP_REPAIR_QUEUE selects, the
// TCPI_OPT_* bits of tcp_info's tcpi_options (which image.TCPConn.Options
// records), and the option kinds TCP_REPAIR_OPTIONS takes. The capture
// (migrate/capture) reads a connection with them and the loader rebuilds
// it, so both sides must agree on each value.
package tcprepair

// TCP_REPAIR_QUEUE values (include/uapi/linux/tcp.h).
const (
	NoQueue   = 0
	RecvQueue = 1
	SendQueue = 2
)

// TCPI_OPT_* bits of tcpi_options (include/uapi/linux/tcp.h).
const (
	OptTimestamps = 1
	OptSack       = 2
	OptWscale     = 4
	OptUsecTS     = 64
)

// TCP option kinds accepted by TCP_REPAIR_OPTIONS (include/net/tcp.h).
const (
	KindMSS       = 2
	KindWindow    = 3
	KindSackPerm  = 4
	KindTimestamp = 8
)
