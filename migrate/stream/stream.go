package stream

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Header keys this package owns. Every snapshot carries compress and
// encrypt; an encrypted one also carries key, keyid and salt.
const (
	KeyCompress = "compress" // none|gzip|flate|snappy|zstd (auto writes snappy)
	KeyEncrypt  = "encrypt"  // none|aes-gcm|chacha20-poly1305
	KeyKeyName  = "key"      // base name of the key file (a lookup hint)
	KeyKeyID    = "keyid"    // KeyID of the key: 16 hex digits
	KeySalt     = "salt"     // 16 random bytes, 32 hex digits, fresh per stream
	KeyPeer     = "peer"     // the receiving socket's greeting nonce, 32 hex digits
)

var ownKeys = []string{KeyCompress, KeyEncrypt, KeyKeyName, KeyKeyID, KeySalt, KeyPeer}

// peerNoncer is implemented by network endpoints: the nonce the receiver
// sent in its greeting. The writer puts it on the header line (peer=), the
// reader insists on seeing its own: a recorded stream replayed to another
// connection is refused, and with encryption the header line (so peer=) is
// authenticated by every chunk.
type peerNoncer interface {
	peerNonce() []byte
}

// Options choose the layers a snapshot body goes through.
type Options struct {
	// Codec compresses the body (the zero Codec: none). ParseCodec reads
	// it from a -compress value.
	Codec Codec
	// Cipher encrypts and authenticates the body under Key ("" or
	// CipherNone: plaintext, and Key must be nil).
	Cipher Cipher
	// Key is the pre-shared key of Cipher: its name goes on the header
	// line, its bytes never leave this process.
	Key *Key
	// Params are extra header fields owned by the caller (for example the
	// record format). They are authenticated when the stream is encrypted.
	// Their names must not collide with this package's keys.
	Params map[string]string
}

// ParseOptions reads a -compress value (see ParseCodec) and an -encrypt
// value — none (or empty), aes-gcm:KEYFILE or chacha20-poly1305:KEYFILE,
// KEYFILE holding exactly KeySize random bytes — into Options, reading
// the key file: the parsing the command-line tools share.
func ParseOptions(compress, encrypt string) (Options, error) {
	c, err := ParseCodec(compress)
	if err != nil {
		return Options{}, fmt.Errorf("stream: %w", err)
	}
	cipherName, keyPath, err := ParseEncrypt(encrypt)
	if err != nil {
		return Options{}, fmt.Errorf("stream: %w", err)
	}
	o := Options{Codec: c, Cipher: cipherName}
	if cipherName == CipherNone {
		return o, nil
	}
	k, err := ReadKeyFile(keyPath)
	if err != nil {
		return Options{}, fmt.Errorf("stream: open key %s: %w", encrypt, err)
	}
	if !validKeyName(k.Name) {
		return Options{}, fmt.Errorf("stream: open key %s: file name %q cannot go on the header line (use letters, digits, '-', '_', '.', no leading '.')", encrypt, k.Name)
	}
	o.Key = &k
	return o, nil
}

// ReaderOptions say what NewReader accepts.
type ReaderOptions struct {
	// Keys are the keys an encrypted snapshot's key is looked up in by
	// its ID, before KeyDir.
	Keys []Key
	// KeyDir is the directory of key files an encrypted snapshot's key is
	// looked up in (by the header's key name, then by key ID).
	KeyDir string
	// RequireEncryption refuses plaintext snapshots. Set it whenever keys
	// are configured: otherwise an attacker can replace an encrypted stream
	// by a plaintext one of their own making.
	RequireEncryption bool
	// Known lists the header keys the caller reads (Options.Params on the
	// writer side); any other unknown key is an error.
	Known []string
}

// linker is implemented by the Sinks and Sources that can run the
// migration handshake; NewWriter and NewReader hand them the stream's
// handshake key (nil when the stream is not encrypted).
type linker interface {
	link(hsKey []byte, encrypted bool) error
}

// bodyEnder is told by the body reader that the body was read to a clean
// io.EOF: every layer verified to the end, so the receiver may report ready.
type bodyEnder interface {
	bodyEOF()
}

// bodyDoner is told by the body writer that every layer was flushed
// successfully, so the sink may announce the end of the body.
type bodyDoner interface {
	bodyDone()
}

// NewWriter writes the header line naming every layer to w and returns the
// writer for the body: records → compression → encryption → w. Close
// flushes and finalizes every layer (the last AEAD chunk) but does not
// close w. Pass a Sink itself as w (or a ProgressWriter around it) so that
// its handshake is keyed to this stream.
func NewWriter(w io.Writer, opt Options) (io.WriteCloser, error) {
	comp := opt.Codec
	if err := comp.check(); err != nil {
		return nil, fmt.Errorf("stream: %w", err)
	}
	cipherName := string(opt.Cipher)
	switch cipherName {
	case "":
		cipherName = CipherNone
	case CipherNone, CipherAESGCM, CipherChaCha20:
	default:
		return nil, fmt.Errorf("stream: unknown encryption %q (want none, aes-gcm or chacha20-poly1305)", cipherName)
	}
	h := &Header{Version: Version, Params: map[string]string{
		KeyCompress: comp.wireName(),
		KeyEncrypt:  cipherName,
	}}
	for k, v := range opt.Params {
		if contains(ownKeys, k) {
			return nil, fmt.Errorf("stream: header parameter %q is reserved", k)
		}
		h.Params[k] = v
	}
	var k *key
	var salt [saltSize]byte
	switch {
	case cipherName == CipherNone && opt.Key != nil:
		return nil, fmt.Errorf("stream: key %s given without encryption", opt.Key.Name)
	case cipherName != CipherNone && opt.Key == nil:
		return nil, fmt.Errorf("stream: encryption %s needs a key", cipherName)
	case cipherName != CipherNone:
		var err error
		if k, err = opt.Key.load(); err != nil {
			return nil, fmt.Errorf("stream: %w", err)
		}
		if _, err := rand.Read(salt[:]); err != nil {
			return nil, fmt.Errorf("stream: salt: %w", err)
		}
		h.Params[KeyKeyName] = k.name
		h.Params[KeyKeyID] = k.id
		h.Params[KeySalt] = hex.EncodeToString(salt[:])
	}
	if p, ok := w.(peerNoncer); ok && p.peerNonce() != nil {
		h.Params[KeyPeer] = hex.EncodeToString(p.peerNonce())
	}
	if err := WriteHeader(w, h); err != nil {
		return nil, fmt.Errorf("stream: write %w", err)
	}
	bw := &bodyWriter{}
	var lower io.WriteCloser = nopWriteCloser{w}
	var hsKey []byte
	if k != nil {
		payload, hs, err := deriveKeys(k, cipherName, salt[:], h.String())
		if err != nil {
			return nil, fmt.Errorf("stream: derive key: %w", err)
		}
		a, err := newAEAD(cipherName, payload)
		clear(payload)
		if err != nil {
			return nil, fmt.Errorf("stream: %s: %w", cipherName, err)
		}
		lower = newSealWriter(a, w, workers())
		hsKey = hs
	}
	if l, ok := w.(linker); ok {
		if err := l.link(hsKey, k != nil); err != nil {
			return nil, err
		}
		bw.sink, _ = w.(bodyDoner)
	}
	upper, err := comp.newCompressor(lower)
	if err != nil {
		return nil, fmt.Errorf("stream: %s: %w", comp.Name, err)
	}
	bw.upper, bw.lower = upper, lower
	return bw, nil
}

// bodyWriter closes the layers top down.
type bodyWriter struct {
	upper, lower io.WriteCloser
	sink         bodyDoner
	err          error
	closed       bool
}

func (b *bodyWriter) Write(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.closed {
		return 0, errors.New("stream: write after close")
	}
	n, err := b.upper.Write(p)
	if err != nil {
		b.err = fmt.Errorf("stream: write: %w", err)
		return n, b.err
	}
	return n, nil
}

func (b *bodyWriter) Close() error {
	if b.closed || b.err != nil {
		return b.err
	}
	b.closed = true
	if err := b.upper.Close(); err != nil {
		b.err = fmt.Errorf("stream: close compression: %w", err)
		return b.err
	}
	if err := b.lower.Close(); err != nil {
		b.err = fmt.Errorf("stream: close encryption: %w", err)
		return b.err
	}
	if b.sink != nil {
		b.sink.bodyDone()
	}
	return nil
}

// ParseEncrypt splits an -encrypt value into a cipher and a key path.
func ParseEncrypt(s string) (c Cipher, keyPath string, err error) {
	name, path, hasPath := strings.Cut(s, ":")
	lname := strings.ToLower(name)
	switch lname {
	case "", CipherNone:
		if hasPath {
			return "", "", fmt.Errorf("encryption %q: none takes no key", s)
		}
		return CipherNone, "", nil
	case CipherAESGCM, CipherChaCha20:
		if !hasPath || path == "" {
			return "", "", fmt.Errorf("encryption %s needs a key file: %s:KEYFILE (make one with: (umask 077; head -c 32 /dev/urandom > k.key))", lname, lname)
		}
		return Cipher(lname), path, nil
	case "aes-cfb", "aes-ctr", "aes-ofb":
		return "", "", fmt.Errorf("encryption %s refused: an unauthenticated stream cipher lets anyone who can flip bits in transit change the restored code; use aes-gcm:KEYFILE or chacha20-poly1305:KEYFILE", strings.ToUpper(name))
	}
	return "", "", fmt.Errorf("unknown encryption %q (want none, aes-gcm:KEYFILE or chacha20-poly1305:KEYFILE)", s)
}

// NewReader reads the header line from r, finds the key (if the snapshot is
// encrypted) and returns the decoded body and the header. The body's Read
// returns plaintext only once it has been verified; every error sticks.
// Close releases the decoders; it does not close r. Pass a Source itself as
// r (or a ProgressReader around it) so that its handshake is keyed to this
// stream.
func NewReader(r io.Reader, opt ReaderOptions) (io.ReadCloser, *Header, error) {
	where := "stream: "
	if s, ok := r.(fmt.Stringer); ok {
		where = "stream: " + s.String() + ": "
	}
	// One buffer under every layer: the header is read byte by byte and a
	// raw record stream in small pieces.
	in := bufio.NewReaderSize(r, 64<<10)
	h, body, hsKey, err := openHeader(in, r, opt, where)
	if err != nil {
		return nil, nil, err
	}
	if l, ok := r.(linker); ok {
		if err := l.link(hsKey, hsKey != nil); err != nil {
			return nil, nil, fmt.Errorf("%s%w", where, err)
		}
	}
	br := &bodyReader{where: where}
	br.src, _ = r.(bodyEnder)
	if compName := h.Get(KeyCompress, ""); compName != CompressNone {
		buf, ok := body.(*bufio.Reader)
		if !ok {
			buf = bufio.NewReaderSize(body, 64<<10)
		}
		d, err := newDecompressor(compName, buf)
		if err != nil {
			return nil, nil, fmt.Errorf("%s%s: %w", where, compName, err)
		}
		br.upper, br.closer, br.tail = d, d, buf
	} else {
		br.upper = body
	}
	return br, h, nil
}

// openHeader reads the header line from in, checks it (against the nonce
// of src's connection, when src has one) and opens the body's encryption
// layer: body returns verified plaintext of the (still compressed) body,
// and hsKey is the handshake key (nil without encryption). NewReader and a
// keyed listener vetting a connection (netSource.vet) both decide here.
func openHeader(in *bufio.Reader, src any, opt ReaderOptions, where string) (h *Header, body io.Reader, hsKey []byte, err error) {
	known := append(append([]string{}, ownKeys...), opt.Known...)
	h, err = ReadHeader(in, known...)
	if err != nil {
		if strings.HasPrefix(err.Error(), "read snapshot header: stream: ") {
			return nil, nil, nil, errors.Unwrap(err)
		}
		return nil, nil, nil, fmt.Errorf("%s%w", where, err)
	}
	if p, ok := src.(peerNoncer); ok && p.peerNonce() != nil {
		if h.Get(KeyPeer, "") != hex.EncodeToString(p.peerNonce()) {
			return nil, nil, nil, fmt.Errorf("%ssnapshot was not sent for this connection (peer=%s): a replayed stream?", where, h.Get(KeyPeer, "missing"))
		}
	} else if _, ok := h.Params[KeyPeer]; ok {
		// A stream sent to a network receiver, captured and fed to a
		// file or a pipe: its -halt sender has long decided.
		return nil, nil, nil, fmt.Errorf("%ssnapshot was sent to a network receiver (peer=%s), not written for a file or pipe: a replayed stream?", where, h.Get(KeyPeer, ""))
	}
	compName := h.Get(KeyCompress, "")
	if !contains([]string{CompressNone, CompressGzip, CompressFlate, CompressSnappy, CompressZstd}, compName) {
		return nil, nil, nil, fmt.Errorf("%ssnapshot header: bad compress=%q", where, compName)
	}
	cipherName := h.Get(KeyEncrypt, "")
	body = in
	switch cipherName {
	case CipherNone:
		for _, k := range []string{KeyKeyName, KeyKeyID, KeySalt} {
			if _, ok := h.Params[k]; ok {
				return nil, nil, nil, fmt.Errorf("%ssnapshot header: %s= given without encryption", where, k)
			}
		}
		if opt.RequireEncryption {
			return nil, nil, nil, fmt.Errorf("%ssnapshot is not encrypted and this reader requires encryption: refusing plaintext", where)
		}
	case CipherAESGCM, CipherChaCha20:
		name, id, saltHex := h.Get(KeyKeyName, ""), h.Get(KeyKeyID, ""), h.Get(KeySalt, "")
		salt, err := hex.DecodeString(saltHex)
		if err != nil || len(salt) != saltSize || len(id) != 2*keyIDLen || name == "" {
			return nil, nil, nil, fmt.Errorf("%ssnapshot header: encrypted with %s but key=, keyid= or salt= missing or malformed", where, cipherName)
		}
		k, err := findKey(opt.Keys, opt.KeyDir, name, id)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("%sopen key %s:%s: %w", where, cipherName, name, err)
		}
		payload, hs, err := deriveKeys(k, cipherName, salt, h.raw)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("%sderive key: %w", where, err)
		}
		a, err := newAEAD(cipherName, payload)
		clear(payload)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("%s%s: %w", where, cipherName, err)
		}
		body = newOpenReader(a, in, workers())
		hsKey = hs
	default:
		return nil, nil, nil, fmt.Errorf("%ssnapshot header: bad encrypt=%q", where, cipherName)
	}
	return h, body, hsKey, nil
}

// bodyReader is the top of the reading stack: it makes errors stick, and
// checks that nothing follows a compressed body that ends by itself.
type bodyReader struct {
	where  string
	upper  io.Reader
	closer io.Closer
	tail   io.Reader // what follows the compressed data; nil without compression
	src    bodyEnder // told about a clean end, may be nil
	err    error
}

func (b *bodyReader) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.upper.Read(p)
	if err == nil {
		return n, nil
	}
	if err == io.EOF {
		if b.tail != nil {
			var one [1]byte
			m, terr := io.ReadFull(b.tail, one[:])
			switch {
			case m > 0:
				err = errors.New("data after the end of the compressed body")
			case terr != io.EOF:
				err = terr
			}
		}
		if err == io.EOF {
			b.err = io.EOF
			b.release()
			if b.src != nil {
				b.src.bodyEOF()
			}
			return n, io.EOF
		}
	}
	if errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		err = io.ErrUnexpectedEOF
	}
	if strings.HasPrefix(err.Error(), "stream: ") {
		b.err = err // already names the operation and the endpoint
	} else {
		b.err = fmt.Errorf("%s%w", b.where, err)
	}
	b.release()
	return n, b.err
}

func (b *bodyReader) release() {
	if b.closer != nil {
		b.closer.Close()
		b.closer = nil
	}
}

// Close releases the decoders. It does not close the underlying reader.
func (b *bodyReader) Close() error {
	b.release()
	if b.err == nil {
		b.err = errors.New("stream: read after close")
	}
	return nil
}
