package pid1

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/kiln-dev/kiln/internal/guest/proto"
)

// Defaults applied to a RunConfig.
const (
	defaultPath     = "/usr/local/bin:/usr/bin:/bin"
	defaultHome     = "/root"
	defaultHostname = "kiln"
	defaultTmpfsMiB = 64
	maxConfigSize   = 4 << 20
)

// decodeConfig parses and validates a Config payload and fills in defaults.
func decodeConfig(payload []byte) (proto.RunConfig, error) {
	var c proto.RunConfig
	if err := json.Unmarshal(payload, &c); err != nil {
		return c, fmt.Errorf("decoding config: %w", err)
	}
	switch c.Mode {
	case proto.ModeRun:
		if len(c.Argv) == 0 || c.Argv[0] == "" {
			return c, errors.New("config: run mode needs a command (argv is empty)")
		}
	case proto.ModeServe:
		if len(c.AgentArgv) == 0 || c.AgentArgv[0] == "" {
			return c, errors.New("config: serve mode needs agent_argv")
		}
	default:
		return c, fmt.Errorf("config: unknown mode %q (want %q or %q)", c.Mode, proto.ModeRun, proto.ModeServe)
	}
	if c.Cwd == "" {
		c.Cwd = "/"
	}
	if c.Hostname == "" {
		c.Hostname = defaultHostname
	}
	if c.TmpfsMiB <= 0 {
		c.TmpfsMiB = defaultTmpfsMiB
	}
	return c, nil
}

// environ turns the config environment into a sorted KEY=VALUE list with
// PATH and HOME defaulted.
func environ(env map[string]string) []string {
	out := make([]string, 0, len(env)+2)
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	if _, ok := env["PATH"]; !ok {
		out = append(out, "PATH="+defaultPath)
	}
	if _, ok := env["HOME"]; !ok {
		out = append(out, "HOME="+defaultHome)
	}
	sort.Strings(out)
	return out
}

// lookPath resolves a command name like a shell does: names containing a
// slash are used as is, others are searched in pathEnv.
func lookPath(file, pathEnv string) (string, error) {
	if strings.Contains(file, "/") {
		if err := executable(file); err != nil {
			return "", fmt.Errorf("%s: %w", file, err)
		}
		return file, nil
	}
	if pathEnv == "" {
		pathEnv = defaultPath
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: no such file in PATH %s", file, pathEnv)
}

func executable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errors.New("no such file")
		}
		return err
	}
	if fi.IsDir() {
		return errors.New("is a directory")
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return errors.New("permission denied (not executable)")
	}
	return nil
}

// agentCommand returns the agent's argv for serve mode.
func agentCommand(c proto.RunConfig, portDev string) []string {
	argv := append(append([]string(nil), c.AgentArgv...), "--port", portDev)
	if len(c.Preload) > 0 {
		argv = append(argv, "--preload", strings.Join(c.Preload, ","))
	}
	return argv
}

// findPort returns the virtio-serial port (e.g. "vport0p1") whose name file
// under classDir (normally /sys/class/virtio-ports) reads name.
func findPort(classDir, name string) (string, error) {
	ents, err := os.ReadDir(classDir)
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(classDir, e.Name(), "name"))
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return e.Name(), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %q in %s", name, classDir)
}

// parseOOMKill returns the oom_kill counter of a /proc/vmstat listing.
func parseOOMKill(r io.Reader) (uint64, bool) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok || k != "oom_kill" {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, false
		}
		return n, true
	}
	return 0, false
}

// randPoolInfo encodes struct rand_pool_info { int entropy_count; int
// buf_size; __u32 buf[]; } for RNDADDENTROPY, crediting 8 bits per byte.
func randPoolInfo(entropy []byte) []byte {
	b := make([]byte, 8+len(entropy))
	binary.NativeEndian.PutUint32(b[0:], uint32(len(entropy)*8))
	binary.NativeEndian.PutUint32(b[4:], uint32(len(entropy)))
	copy(b[8:], entropy)
	return b
}

// splitLines cuts a log stream into lines of at most max bytes each,
// calling emit for every line (without the newline).
func splitLines(r io.Reader, max int, emit func(string)) error {
	br := bufio.NewReaderSize(r, max)
	for {
		line, isPrefix, err := br.ReadLine()
		if len(line) > 0 || (err == nil && !isPrefix) {
			emit(string(line))
		}
		if err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}
