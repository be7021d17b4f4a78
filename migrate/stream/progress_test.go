package stream

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"
)

func TestProgressLine(t *testing.T) {
	var out bytes.Buffer
	clock := time.Unix(1000, 0)
	pw := NewProgressWriter(io.Discard, "freeze", 4<<20)
	pw.p.out = &out // pretend stderr is a terminal
	pw.p.now = func() time.Time { return clock }
	for i := 0; i < 4; i++ {
		pw.Write(make([]byte, 1<<20))
		clock = clock.Add(time.Second)
	}
	pw.Finish()
	s := out.String()
	for _, want := range []string{"freeze  1.0 MiB", "ETA 0:01", "freeze  4.0 MiB  1.0 MiB/s  100%\n"} {
		if !strings.Contains(s, want) {
			t.Errorf("progress output %q lacks %q", s, want)
		}
	}
}

func TestProgressSilentWithoutTerminal(t *testing.T) {
	// Under go test, stderr is a pipe or a file.
	pr := NewProgressReader(strings.NewReader("hello"), "thaw", 5)
	if pr.p.out != nil {
		t.Skip("stderr is a terminal here")
	}
	io.ReadAll(pr)
	pr.Finish()
}

// A Sink wrapped in a ProgressWriter still gets its handshake key.
func TestProgressKeepsHandshake(t *testing.T) {
	dir := testKeys(t)
	src := listenLoopback(t, 5*time.Second)
	done := make(chan error, 1)
	go func() {
		sink, err := OpenSink("tcp:"+src.Addr(), SinkOptions{})
		if err != nil {
			done <- err
			return
		}
		defer sink.Close()
		pw := NewProgressWriter(sink, "send", 0)
		w, err := NewWriter(pw, opts("zstd", encryptOpt(dir, CipherAESGCM, "k1.key")))
		if err != nil {
			done <- err
			return
		}
		w.Write([]byte("records"))
		w.Close()
		pw.Finish()
		if err := sink.AwaitReady(5 * time.Second); err != nil {
			done <- err
			return
		}
		done <- sink.Commit()
	}()
	pr := NewProgressReader(src, "receive", 0)
	got, err := readAllFrom(pr, ReaderOptions{KeyDir: dir, RequireEncryption: true})
	if err != nil || string(got) != "records" {
		t.Fatalf("got %q, %v", got, err)
	}
	if err := src.Ready(nil); err != nil {
		t.Fatal(err)
	}
	if err := src.AwaitCommit(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
