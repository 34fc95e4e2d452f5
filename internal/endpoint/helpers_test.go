package endpoint

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-dev/kiln/internal/testutil"
	"github.com/kiln-dev/kiln/internal/testutil/testimage"
)

func TestMain(m *testing.M) {
	if cfg := os.Getenv("KILN_ENDPOINT_HELPER"); cfg != "" {
		os.Exit(helperMain(cfg))
	}
	testutil.Main(m)
}

// helperMain runs an endpoint in this (re-executed) test binary until it
// is killed: the restart test SIGKILLs it. It writes the listen address to
// the file named in the config.
func helperMain(cfgJSON string) int {
	var hc helperConfig
	if err := json.Unmarshal([]byte(cfgJSON), &hc); err != nil {
		fmt.Fprintln(os.Stderr, "helper config:", err)
		return 2
	}
	s, err := New(Config{StateDir: hc.State, ImagesDir: hc.Images, MaxVMs: hc.MaxVMs, Paused: hc.Paused})
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	listen := hc.Listen
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	tmp := hc.AddrFile + ".tmp"
	os.WriteFile(tmp, []byte(ln.Addr().String()), 0o600)
	os.Rename(tmp, hc.AddrFile)
	s.Serve(context.Background(), ln)
	return 0
}

type helperConfig struct {
	State, Images, AddrFile string
	Listen                  string // default: a free loopback port
	MaxVMs                  int
	Paused                  bool
}

// endpointProcess is an endpoint in a re-executed test binary, for tests
// that kill it -9.
type endpointProcess struct {
	cmd  *exec.Cmd
	addr string
	done chan struct{} // closed when the process has been reaped
}

// startEndpointProcess starts an endpoint subprocess and waits for its
// address; the test's cleanup kills it if the test did not.
func startEndpointProcess(t *testing.T, hc helperConfig) *endpointProcess {
	t.Helper()
	hc.AddrFile = filepath.Join(t.TempDir(), "addr")
	j, _ := json.Marshal(hc)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "KILN_ENDPOINT_HELPER="+string(j))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &endpointProcess{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(p.kill)
	testutil.WaitFor(t, 2*time.Minute, "the endpoint subprocess writing its address", func() bool {
		select {
		case <-p.done:
			t.Fatalf("the endpoint subprocess exited before listening: %v", cmd.ProcessState)
		default:
		}
		_, err := os.Stat(hc.AddrFile)
		return err == nil
	})
	addr, err := os.ReadFile(hc.AddrFile)
	if err != nil {
		t.Fatal(err)
	}
	p.addr = string(addr)
	return p
}

// kill SIGKILLs the endpoint and waits until it is gone.
func (p *endpointProcess) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// startClientScript runs testdata/script with the repository's SDK on its
// path, stderr to the test's, and returns it with a scanner of its stdout
// lines; the test's cleanup kills it if it still runs.
func startClientScript(t *testing.T, script string, args ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	root := testutil.RepoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, "/usr/bin/python3", append([]string{filepath.Join(root, "internal/endpoint/testdata", script)}, args...)...)
	cmd.Env = append(os.Environ(), "PYTHONPATH="+filepath.Join(root, "python"), "PYTHONDONTWRITEBYTECODE=1")
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	return cmd, sc
}

// client talks to an endpoint over real HTTP.
type client struct {
	t     testing.TB
	url   string
	token string
	hc    *http.Client
}

func newClient(t testing.TB, url, token string) *client {
	return &client{t: t, url: url, token: token, hc: &http.Client{Timeout: 10 * time.Minute}}
}

// do sends body (a string is sent as is, anything else as JSON) and
// returns the status and response body.
func (c *client) do(method, path string, body any) (int, []byte, http.Header) {
	c.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			c.t.Fatal(err)
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.url+path, r)
	if err != nil {
		c.t.Fatal(err)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp.StatusCode, out, resp.Header
}

// json sends a request, checks the status and decodes the response.
func (c *client) json(method, path string, body any, want int, dst any) {
	c.t.Helper()
	code, out, _ := c.do(method, path, body)
	if code != want {
		c.t.Fatalf("%s %s = %d %s, want %d", method, path, code, out, want)
	}
	if dst != nil {
		if err := json.Unmarshal(out, dst); err != nil {
			c.t.Fatalf("%s %s: decoding %s: %v", method, path, out, err)
		}
	}
}

type testServer struct {
	*Server
	url string
	c   *client
}

// startServer runs an endpoint on loopback over real HTTP.
func startServer(t testing.TB, cfg Config) *testServer {
	t.Helper()
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New() error = %v", err)
	}
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		hs.Close()
		s.Close()
	})
	return &testServer{Server: s, url: hs.URL, c: newClient(t, hs.URL, s.Token())}
}

// imagesDir makes an images directory holding the numpy test image as "numpy".
func imagesDir(t testing.TB) string {
	t.Helper()
	img := testimage.Numpy(t)
	d := t.TempDir()
	if err := os.Symlink(img, filepath.Join(d, "numpy.kimg")); err != nil {
		t.Fatal(err)
	}
	return d
}

// putFunction stores a function directly (for tests that run no VM).
func putFunction(t testing.TB, s *Server, id string, retries int) *Function {
	t.Helper()
	fn := &Function{ID: id, Name: id, Kind: "source", Source: "def f(x):\n    return x\n", Entry: "f", Image: "none", ImagePath: "/nonexistent", ImageDigest: strings.Repeat("0", 64),
		TimeoutMS: 60000, MemoryMiB: 256, MaxResult: 1 << 20, MaxRetries: retries, Created: time.Now()}
	if err := s.Store().PutFunction(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
	return fn
}
