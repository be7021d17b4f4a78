package stream

import (
	"bytes"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"strings"
	"testing"
	"time"
)

// benchSize is the body size of every benchmark.
const benchSize = 64 << 20

// pageLikeData imitates process memory: 4 KiB pages of which about 40%
// are zero, 30% text, 20% small integers and pointers, 10% random.
func pageLikeData(n int) []byte {
	r := mrand.New(mrand.NewPCG(42, 42))
	b := make([]byte, 0, n)
	text := []byte(strings.Repeat("GET /index.html HTTP/1.1 user=alice session=42 path=/usr/lib/x86_64-linux-gnu/libc.so.6 ", 64))
	for len(b) < n {
		page := make([]byte, 4096)
		switch k := r.IntN(10); {
		case k < 4:
		case k < 7:
			off := r.IntN(len(text) - 4096)
			copy(page, text[off:])
		case k < 9:
			base := 0x7f1200000000 + uint64(r.IntN(1<<20))*8
			for i := 0; i < 4096; i += 8 {
				v := base + uint64(r.IntN(64))*16
				if r.IntN(3) == 0 {
					v = uint64(r.IntN(1000))
				}
				for j := 0; j < 8; j++ {
					page[i+j] = byte(v >> (8 * j))
				}
			}
		default:
			for i := range page {
				page[i] = byte(r.Uint32())
			}
		}
		b = append(b, page...)
	}
	return b[:n]
}

func randomData(n int) []byte {
	r := mrand.NewChaCha8([32]byte{1})
	b := make([]byte, n)
	r.Read(b)
	return b
}

// onlyWriter and onlyReader hide ReadFrom/WriteTo so that io.Copy really
// moves the bytes through a buffer, like the layers do.
type onlyWriter struct{ io.Writer }
type onlyReader struct{ io.Reader }

// BenchmarkStream measures each compression x encryption on 64 MiB, writing
// (encode to io.Discard) and reading (decode from memory), next to a plain
// io.Copy of the same bytes. Run it with:
//
//	go test -run '^$' -bench BenchmarkStream -benchtime 3x ./migrate/stream
func BenchmarkStream(b *testing.B) {
	dir := testKeys(b)
	inputs := []struct {
		name string
		data []byte
	}{{"random", randomData(benchSize)}, {"pagelike", pageLikeData(benchSize)}}
	for _, in := range inputs {
		b.Run(in.name+"/baseline-io.Copy", func(b *testing.B) {
			b.SetBytes(benchSize)
			for i := 0; i < b.N; i++ {
				io.Copy(onlyWriter{io.Discard}, onlyReader{bytes.NewReader(in.data)})
			}
		})
		for _, c := range compressions {
			for _, e := range ciphers {
				opt := opts(c, encryptOpt(dir, e, "k1.key"))
				var encoded []byte
				b.Run(fmt.Sprintf("%s/%s/%s/write", in.name, c, e), func(b *testing.B) {
					b.SetBytes(benchSize)
					var cw countWriter
					for i := 0; i < b.N; i++ {
						cw = 0
						w, err := NewWriter(&cw, opt)
						if err != nil {
							b.Fatal(err)
						}
						if _, err := io.Copy(w, onlyReader{bytes.NewReader(in.data)}); err != nil {
							b.Fatal(err)
						}
						if err := w.Close(); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64(cw)/benchSize, "size-ratio")
				})
				encoded = encode(b, in.data, opt)
				b.Run(fmt.Sprintf("%s/%s/%s/read", in.name, c, e), func(b *testing.B) {
					b.SetBytes(benchSize)
					for i := 0; i < b.N; i++ {
						r, _, err := NewReader(bytes.NewReader(encoded), ReaderOptions{KeyDir: dir})
						if err != nil {
							b.Fatal(err)
						}
						n, err := io.Copy(onlyWriter{io.Discard}, r)
						if err != nil || n != benchSize {
							b.Fatalf("read %d bytes: %v", n, err)
						}
						r.Close()
					}
				})
			}
		}
	}
}

type countWriter int64

func (c *countWriter) Write(p []byte) (int, error) { *c += countWriter(len(p)); return len(p), nil }

// BenchmarkLoopback sends 64 MiB through a real tcp connection on
// 127.0.0.1, sender and receiver in one process, including the handshake.
func BenchmarkLoopback(b *testing.B) {
	dir := testKeys(b)
	data := pageLikeData(benchSize)
	for _, mode := range []Options{
		opts("none", "none"),
		opts("none", encryptOpt(dir, CipherAESGCM, "k1.key")),
		opts("snappy", encryptOpt(dir, CipherAESGCM, "k1.key")),
		opts("zstd", encryptOpt(dir, CipherAESGCM, "k1.key")),
	} {
		name := mode.Codec.String() + "/" + string(mode.Cipher)
		b.Run(name, func(b *testing.B) {
			b.SetBytes(benchSize)
			for i := 0; i < b.N; i++ {
				src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 10 * time.Second})
				if err != nil {
					b.Fatal(err)
				}
				errc := make(chan error, 1)
				go func() { errc <- send("tcp:"+src.Addr(), data, mode, true) }()
				n, err := receiveDiscard(src, ReaderOptions{KeyDir: dir})
				if err != nil || n != benchSize {
					b.Fatalf("receive: %d bytes, %v", n, err)
				}
				if err := <-errc; err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// receiveDiscard is receive without keeping the bytes.
func receiveDiscard(src Source, opt ReaderOptions) (int64, error) {
	defer src.Close()
	r, _, err := NewReader(src, opt)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	n, err := io.Copy(onlyWriter{io.Discard}, r)
	if err != nil {
		src.Ready(err)
		return n, err
	}
	if err := src.Ready(nil); err != nil {
		return n, err
	}
	return n, src.AwaitCommit(10 * time.Second)
}

// BenchmarkPipeline seals and opens 64 MiB of random data with AES-GCM at
// fixed depths (chunks at once), in writes and reads of 256 KiB (the image
// codec's buffer), to show what the crew gains where cores are free; the
// stream itself picks workers(). Run it with:
//
//	go test -run '^$' -bench BenchmarkPipeline -benchtime 5x -count 3 ./migrate/stream
func BenchmarkPipeline(b *testing.B) {
	a := testAEAD(b, CipherAESGCM)
	data := randomData(benchSize)
	sealed := referenceSeal(a, data)
	const ioSize = 256 << 10
	for _, depth := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("seal/depth-%d", depth), func(b *testing.B) {
			b.SetBytes(benchSize)
			for i := 0; i < b.N; i++ {
				w := newSealWriter(a, io.Discard, depth)
				for p := data; len(p) > 0; p = p[ioSize:] {
					if _, err := w.Write(p[:ioSize]); err != nil {
						b.Fatal(err)
					}
				}
				if err := w.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("open/depth-%d", depth), func(b *testing.B) {
			b.SetBytes(benchSize)
			buf := make([]byte, ioSize)
			for i := 0; i < b.N; i++ {
				r := newOpenReader(a, bytes.NewReader(sealed), depth)
				n := 0
				for {
					k, err := r.Read(buf)
					n += k
					if err != nil {
						if err != io.EOF || n != benchSize {
							b.Fatalf("read %d bytes: %v", n, err)
						}
						break
					}
				}
			}
		})
	}
}
