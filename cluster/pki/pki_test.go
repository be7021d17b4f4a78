package pki

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
)

func TestCADeterministic(t *testing.T) {
	k, _ := NewKey()
	a, err := k.CA()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := k.CA()
	if !bytes.Equal(a.PEM(), b.PEM()) {
		t.Fatal("same key gave two different CAs")
	}
	k2, _ := ParseKey(k.String())
	if !bytes.Equal(k2.GossipKey(), k.GossipKey()) {
		t.Fatal("key does not survive its string form")
	}
}

// TestForeignCertRefused checks that a certificate from another cluster's CA
// cannot talk to this cluster.
func TestForeignCertRefused(t *testing.T) {
	k, _ := NewKey()
	ca, _ := k.CA()
	other, _ := NewKey()
	oca, _ := other.CA()
	srvCert, _ := ca.Issue("srv", net.IPv4(127, 0, 0, 1))
	ln, err := tls.Listen("tcp", "127.0.0.1:0", ca.ServerTLS(srvCert))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	dial := func(cfg *tls.Config) error {
		c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte("x")); err != nil {
			return err
		}
		_, err = c.Read(make([]byte, 1))
		return err
	}
	good, _ := ca.Issue("cli")
	if err := dial(ca.ClientTLS(good)); err != nil {
		t.Fatalf("member certificate: %v", err)
	}
	bad, _ := oca.Issue("cli")
	cfg := ca.ClientTLS(bad)
	if err := dial(cfg); err == nil {
		t.Fatal("certificate from another cluster's CA was accepted")
	}
	if err := dial(&tls.Config{RootCAs: cfg.RootCAs, ServerName: ServerName}); err == nil {
		t.Fatal("connection without a client certificate was accepted")
	}
}
