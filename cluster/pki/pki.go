// Package pki turns the one cluster key into everything that authenticates
// cluster traffic: the gossip encryption key and a cluster CA that signs each
// node's (and each remote CLI's) TLS certificate. Only the key needs to be
// distributed; whoever lacks it can neither join nor read.
package pki

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"time"

	"github.com/pcluster/pcluster/internal/keyfile"
)

// ServerName is the DNS name in every certificate; peers verify it instead of
// addresses, which may be NATed or change.
const ServerName = "pcluster"

// KeySize is the length of a cluster key in bytes (AES-256 for gossip).
const KeySize = 32

// Key is a cluster key.
type Key []byte

// NewKey returns a random cluster key.
func NewKey() (Key, error) {
	k := make(Key, KeySize)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("new cluster key: %w", err)
	}
	return k, nil
}

// String returns the key in base64, the form flags and key files carry.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k) }

// ParseKey reads a base64 cluster key.
func ParseKey(s string) (Key, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("parse cluster key: not base64: %w", err)
	}
	if len(b) != KeySize {
		return nil, fmt.Errorf("parse cluster key: %d bytes, want %d", len(b), KeySize)
	}
	return Key(b), nil
}

// ReadKeyFile reads a base64 cluster key from a file.
func ReadKeyFile(path string) (Key, error) {
	b, err := keyfile.Read(path, 4096)
	if err != nil {
		return nil, fmt.Errorf("read cluster key: %w", err)
	}
	defer clear(b)
	k, err := ParseKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

func (k Key) derive(purpose string) []byte {
	b, err := hkdf.Key(sha256.New, k, nil, "pcluster "+purpose, 32)
	if err != nil {
		panic(err) // only for lengths hkdf cannot produce
	}
	return b
}

// GossipKey returns memberlist's keyring key.
func (k Key) GossipKey() []byte { return k.derive("gossip v1") }

// Authority is the cluster CA derived from a key.
type Authority struct {
	cert *x509.Certificate
	der  []byte
	priv ed25519.PrivateKey
}

// CA derives the cluster CA. The same key always gives the same CA.
func (k Key) CA() (*Authority, error) {
	priv := ed25519.NewKeyFromSeed(k.derive("ca v1"))
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "pcluster cluster CA"},
		NotBefore:             time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2124, 1, 1, 0, 0, 0, 0, time.UTC),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return nil, fmt.Errorf("derive cluster CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("derive cluster CA: %w", err)
	}
	return &Authority{cert: cert, der: der, priv: priv}, nil
}

// PEM returns the CA certificate in PEM form (public; for curl and friends).
func (a *Authority) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.der})
}

// Issue makes a fresh key pair and a certificate for it, valid for both
// ends of a connection, naming ServerName and the given addresses.
func (a *Authority) Issue(commonName string, ips ...net.IP) (tls.Certificate, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue certificate %s: %w", commonName, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue certificate %s: %w", commonName, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: commonName},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{ServerName},
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, priv.Public(), a.priv)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue certificate %s: %w", commonName, err)
	}
	return tls.Certificate{Certificate: [][]byte{der, a.der}, PrivateKey: priv}, nil
}

func (a *Authority) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(a.cert)
	return p
}

// ServerTLS returns a config that accepts only clients holding a
// certificate from this CA.
func (a *Authority) ServerTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    a.pool(),
	}
}

// ClientTLS returns a config that presents cert and trusts only this CA.
func (a *Authority) ClientTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      a.pool(),
		ServerName:   ServerName,
	}
}

// WriteKeyFiles writes a new cluster's key (mode 0600) and CA certificate
// into dir and returns their paths.
func WriteKeyFiles(dir string) (keyPath, caPath string, err error) {
	k, err := NewKey()
	if err != nil {
		return "", "", err
	}
	ca, err := k.CA()
	if err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", fmt.Errorf("keygen: %w", err)
	}
	keyPath, caPath = dir+"/cluster.key", dir+"/ca.pem"
	if _, err := os.Stat(keyPath); err == nil {
		return "", "", fmt.Errorf("keygen: %s exists; refusing to replace a cluster key", keyPath)
	}
	if err := os.WriteFile(keyPath, []byte(k.String()+"\n"), 0o600); err != nil {
		return "", "", fmt.Errorf("keygen: %w", err)
	}
	if err := os.WriteFile(caPath, ca.PEM(), 0o644); err != nil {
		return "", "", fmt.Errorf("keygen: %w", err)
	}
	return keyPath, caPath, nil
}

// CheckpointKey returns the key checkpoint files are encrypted under at
// rest (32 bytes, as stream keys are).
func (k Key) CheckpointKey() []byte { return k.derive("checkpoint v1") }
