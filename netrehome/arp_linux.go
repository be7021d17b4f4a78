package netrehome

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
)

// Announcement is a gratuitous ARP schedule under way for one address.
type Announcement struct {
	stop chan struct{}
	done chan struct{}
	once sync.Once
	err  error // the first failed round's; read after done
}

// Announce sends the first round of gratuitous ARP for a from ifi before
// it returns (an error if that fails: nothing was announced), and the
// rest of s in a goroutine of its own, which ends with the schedule or at
// Stop.
//
// Each round is an ARP request and an ARP reply, both broadcast, with
// sender and target protocol address a and sender hardware address
// ifi's: a neighbour that has a cache entry for a updates it to ifi's
// address (Linux does so even within its locktime for such "gratuitous"
// packets, arp_process's is_garp), and a learning switch moves ifi's
// address to this port.
func Announce(ifi *net.Interface, a netip.Addr, s Schedule) (*Announcement, error) {
	if !a.Is4() {
		return nil, fmt.Errorf("announce %s: only IPv4 addresses are announced", a)
	}
	c, err := arp.Dial(ifi)
	if err != nil {
		return nil, fmt.Errorf("announce %s on %s: %w", a, ifi.Name, err)
	}
	req, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, a, ethernet.Broadcast, a)
	if err == nil {
		var rep *arp.Packet
		rep, err = arp.NewPacket(arp.OperationReply, ifi.HardwareAddr, a, ifi.HardwareAddr, a)
		if err == nil {
			err = round(c, req, rep)
		}
		if err == nil {
			an := &Announcement{stop: make(chan struct{}), done: make(chan struct{})}
			go an.run(c, req, rep, s)
			return an, nil
		}
	}
	c.Close()
	return nil, fmt.Errorf("announce %s on %s: %w", a, ifi.Name, err)
}

func round(c *arp.Client, req, rep *arp.Packet) error {
	if err := c.WriteTo(req, ethernet.Broadcast); err != nil {
		return fmt.Errorf("gratuitous request: %w", err)
	}
	if err := c.WriteTo(rep, ethernet.Broadcast); err != nil {
		return fmt.Errorf("gratuitous reply: %w", err)
	}
	return nil
}

func (an *Announcement) run(c *arp.Client, req, rep *arp.Packet, s Schedule) {
	defer close(an.done)
	defer c.Close()
	start := time.Now()
	var plan []time.Duration // offsets from start of the rounds still to send
	for i := 1; i < s.Rounds; i++ {
		plan = append(plan, time.Duration(i)*s.Interval)
	}
	if s.Repeat > 0 {
		for i := 0; i < max(s.Rounds, 1); i++ {
			plan = append(plan, s.Repeat+time.Duration(i)*s.Interval)
		}
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for _, at := range plan {
		t.Reset(time.Until(start.Add(at)))
		select {
		case <-an.stop:
			return
		case <-t.C:
		}
		if err := round(c, req, rep); err != nil && an.err == nil {
			an.err = err
		}
	}
}

// Stop ends the schedule and waits for its goroutine; it returns the
// first error of a later round, if any.
func (an *Announcement) Stop() error {
	an.once.Do(func() { close(an.stop) })
	<-an.done
	return an.err
}

// Wait waits for the schedule to end and returns the first error of a
// later round, if any.
func (an *Announcement) Wait() error {
	<-an.done
	return an.err
}
