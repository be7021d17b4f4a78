package cluster_test

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/node"
)

// startDev runs pclusterd -dev in a temporary directory and returns the
// node and the status page URL (with its token) it printed.
func startDevWeb(t *testing.T, c *testCluster) (*testNode, string) {
	t.Helper()
	tmp := t.TempDir()
	sock := filepath.Join(tmp, "dev.sock")
	cmd := exec.Command(c.daemon, "-dev", "-node", c.prefix+"-dev", "-socket", sock)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); pw.Close(); close(done) }()
	// Its workload cgroups outlive it: removed after it, by its data
	// directory's name, read while it still exists.
	var devDirs []string
	t.Cleanup(func() {
		for _, d := range devDirs {
			if err := node.RemoveCgroups(c.prefix+"-dev", d); err != nil {
				t.Errorf("dev node: %v", err)
			}
		}
	})
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	t.Cleanup(func() { devDirs, _ = filepath.Glob(filepath.Join(tmp, "pclusterd-dev-*")) })
	urlCh := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`status page: (http://\S+)`)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				urlCh <- m[1]
			}
		}
		close(urlCh)
	}()
	var url string
	select {
	case url = <-urlCh:
	case <-time.After(20 * time.Second):
		t.Fatal("pclusterd -dev printed no status page URL in 20 s")
	}
	if url == "" {
		t.Fatal("pclusterd -dev ended without printing a status page URL")
	}
	nd := &testNode{name: c.prefix + "-dev", socket: sock}
	nd.client, _ = api.New(sock, nil)
	c.waitFor(15*time.Second, "dev cluster leader", func() error { return converged(nd, 1) })
	return nd, url
}

// TestWebPage opens pclusterd -dev's status page in headless chromium:
// without the token nothing is served; with it the page shows the node,
// then a workload started after the page loaded, running with its PID
// (no reload: the event stream updates it), then stopped, and the events
// that happened; on a phone-sized screen nothing overflows the page.
func TestWebPage(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("needs chromium (make deps installs it)")
	}
	c := newTestCluster(t)
	nd, url := startDevWeb(t, c)
	base, token, ok := strings.Cut(url, "?token=")
	if !ok || !strings.HasPrefix(base, "http://127.0.0.1:") {
		t.Fatalf("status page URL %q: want http on 127.0.0.1 with ?token=", url)
	}

	// No token, a wrong one: 401 and one line, for the page and its data.
	for _, u := range []string{base, base + "ui/state", base + "ui/events", base + "?token=" + strings.Repeat("0", len(token))} {
		resp, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || strings.Count(string(body), "\n") != 1 || !strings.Contains(string(body), "access token") {
			t.Errorf("GET %s without the token: %d %q, want 401 and one line", u, resp.StatusCode, body)
		}
	}

	// Beyond loopback without TLS, or a token others can read: pclusterd
	// does not start, and says why in one line.
	tmp := t.TempDir()
	loose := filepath.Join(tmp, "token")
	if err := os.WriteFile(loose, []byte("0123456789abcdef0123\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-web", "0.0.0.0:0"}, "is not loopback: serving the page beyond this host needs TLS"},
		{[]string{"-web-token-file", loose}, "lets other users read it; want 0600"},
		{[]string{"-web-cert", loose}, "give both -web-cert and -web-key"},
	} {
		args := append([]string{"-dev", "-node", c.prefix + "-bad", "-socket", filepath.Join(tmp, "bad.sock")}, tc.args...)
		cmd := exec.Command(c.daemon, args...)
		cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
		out, err := cmd.CombinedOutput()
		var lines []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if strings.HasPrefix(l, "pclusterd") {
				lines = append(lines, l)
			}
		}
		if err == nil || len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
			t.Errorf("pclusterd %v: %v, output:\n%s\nwant a failure and one line saying %q", tc.args, err, out, tc.want)
		}
	}

	profile := t.TempDir()
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox,
		chromedp.UserDataDir(profile), chromedp.Env("TMPDIR="+profile, "HOME="+profile, "XDG_CACHE_HOME="+profile, "XDG_CONFIG_HOME="+profile), chromedp.WindowSize(375, 740))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	// The browser lives as long as bctx; each step gets 30 s of it.
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	step := func() context.Context {
		ctx, cancel := context.WithTimeout(bctx, 30*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	fail := func(what string, err error) {
		t.Helper()
		dom, _ := chromedp.Run(step(), chromedp.OuterHTML(chromedp.CSS("main")))
		t.Fatalf("%s: %v\npage:\n%s", what, err, dom)
	}
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(step(), steps...); err != nil {
			fail(what, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(step(), chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			fail("read "+sel, err)
		}
		return s
	}
	visible := func(sel string) chromedp.Action[chromedp.Void] { return chromedp.WaitVisible(chromedp.CSS(sel)) }

	do("open the page", chromedp.Navigate(url), visible(`#status.live`),
		visible(`tr[data-node="`+nd.name+`"][data-status="ready"]`))
	if row := text(`tr[data-node="` + nd.name + `"]`); !strings.Contains(row, "yes") || !strings.Contains(row, "CPU") {
		t.Errorf("node row %q: want eligible (yes) and its load", row)
	}
	loc, err := chromedp.Run(step(), chromedp.Location())
	if err != nil {
		fail("read the address", err)
	}
	if strings.Contains(loc, "token") {
		t.Errorf("the token stays in the address bar: %s", loc)
	}

	var w api.Workload
	c.ctlJSON(nd, &w, "run", "-name", "webtest", "--", "sleep", "300")
	w = waitState(c, nd, w.ID, "running", 15*time.Second)
	row := `tr[data-workload="` + w.ID + `"]`
	do("see the workload running", visible(row+`[data-state="running"]`))
	got := text(row)
	for _, want := range []string{w.ID, "webtest", "running", nd.name, strconv.Itoa(w.PID)} {
		if !strings.Contains(got, want) {
			t.Errorf("workload row %q lacks %q", got, want)
		}
	}
	do("see it placed and started in the events",
		visible(`li[data-type="workload-started"][data-workload="`+w.ID+`"]`),
		visible(`li[data-type="workload-placed"][data-workload="`+w.ID+`"]`))

	// A checkpoint taken now shows in its table, and as an event.
	c.ctl(nd, "checkpoint", "now", w.ID)
	do("see its checkpoint", visible(`tr[data-checkpoint="`+w.ID+`"]`),
		visible(`li[data-type="checkpoint-taken"][data-workload="`+w.ID+`"]`))

	c.ctl(nd, "stop", w.ID)
	do("see it stopped", visible(row+`[data-state="stopped"]`),
		visible(`li[data-type="workload-stopped"][data-workload="`+w.ID+`"]`))

	// A phone: the page is no wider than the screen (tables scroll in
	// their own region), every table has column headers.
	fits, err := chromedp.Run(step(), chromedp.Evaluate[bool](`document.documentElement.scrollWidth <= window.innerWidth`))
	if err != nil {
		fail("measure", err)
	}
	headed, err := chromedp.Run(step(), chromedp.Evaluate[bool](`[...document.querySelectorAll("table")].every(t => t.querySelectorAll("thead th[scope=col]").length > 0)`))
	if err != nil {
		fail("count headers", err)
	}
	if !fits {
		t.Error("at 375 px wide the page scrolls sideways")
	}
	if !headed {
		t.Error("a table without column headers")
	}
}
