package stream_test

import (
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/pcluster/pcluster/migrate/stream"
)

// Example shows both ends of a -halt migration over tcp, as pfreeze and
// pthaw wire them.
func Example() {
	dir, _ := os.MkdirTemp("", "keys")
	defer os.RemoveAll(dir)
	os.WriteFile(filepath.Join(dir, "site.key"), make([]byte, 32), 0o600) // use head -c 32 /dev/urandom

	// pthaw -src tcp:127.0.0.1:0 -keydir DIR
	src, err := stream.OpenSource("tcp:127.0.0.1:0", stream.SourceOptions{ReadTimeout: 10 * time.Second, HaveKeys: true})
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()

	// pfreeze -dest tcp:ADDR -compress zstd -encrypt aes-gcm:DIR/site.key -halt
	done := make(chan error, 1)
	go func() {
		sink, err := stream.OpenSink("tcp:"+src.Addr(), stream.SinkOptions{DialTimeout: 5 * time.Second, WriteTimeout: 10 * time.Second})
		if err != nil {
			done <- err
			return
		}
		defer sink.Close()
		key, err := stream.ReadKeyFile(filepath.Join(dir, "site.key"))
		if err != nil {
			done <- err
			return
		}
		w, err := stream.NewWriter(sink, stream.Options{Codec: stream.Codec{Name: stream.CompressZstd}, Cipher: stream.CipherAESGCM, Key: &key})
		if err != nil {
			done <- err
			return
		}
		io.WriteString(w, "records...") // the snapshot encoder writes here
		if err := w.Close(); err != nil {
			done <- err
			return
		}
		if err := sink.AwaitReady(time.Minute); err != nil {
			done <- err // resume the original
			return
		}
		// kill the original here, then:
		done <- sink.Commit()
	}()

	r, h, err := stream.NewReader(src, stream.ReaderOptions{KeyDir: dir, RequireEncryption: true})
	if err != nil {
		log.Fatal(err)
	}
	body, err := io.ReadAll(r) // the snapshot decoder reads here, to io.EOF
	r.Close()
	if err != nil {
		src.Ready(err)
		log.Fatal(err)
	}
	// build the process here, then:
	if err := src.Ready(nil); err != nil {
		log.Fatal(err) // kill the half-built process
	}
	if err := src.AwaitCommit(time.Minute); err != nil {
		log.Fatal(err) // kill the half-built process
	}
	// start the clone here
	fmt.Println(h.Get("compress", ""), h.Get("encrypt", ""), h.Get("key", ""), string(body), <-done)
	// Output: zstd aes-gcm site.key records... <nil>
}
