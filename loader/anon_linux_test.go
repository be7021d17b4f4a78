package loader

import (
	"testing"

	"github.com/pcluster/pcluster/migrate/image"
)

// TestTimerfdNow: the expirations a timerfd would have counted between
// its reading and now, and the time left to its next.
func TestTimerfdNow(t *testing.T) {
	const ms = int64(1e6)
	for _, c := range []struct {
		name      string
		tm        image.Timerfd
		now       int64
		wantTicks uint64
		wantValue int64
	}{
		{"disarmed", image.Timerfd{Ticks: 2}, 500 * ms, 2, 0},
		{"not due yet", image.Timerfd{ValueNs: 300 * ms}, 100 * ms, 0, 200 * ms},
		{"one-shot fell", image.Timerfd{Ticks: 0, ValueNs: 300 * ms}, 400 * ms, 1, 0},
		{"periodic, unread kept", image.Timerfd{Ticks: 3, ValueNs: 50 * ms, IntervalNs: 100 * ms}, 1000 * ms, 3 + 10, 50 * ms},
		{"periodic, exactly due", image.Timerfd{ValueNs: 100 * ms, IntervalNs: 100 * ms}, 100 * ms, 1, 100 * ms},
		{"clock went back", image.Timerfd{ValueNs: 100 * ms}, -5 * ms, 0, 100 * ms},
	} {
		gotTicks, gotValue := timerfdNow(&c.tm, c.now)
		if gotTicks != c.wantTicks || gotValue != c.wantValue {
			t.Errorf("%s: got %d ticks, %d ns left; want %d, %d", c.name, gotTicks, gotValue, c.wantTicks, c.wantValue)
		}
	}
}
