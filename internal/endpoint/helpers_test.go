package endpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
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
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
	MaxVMs                  int
	Paused                  bool
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
