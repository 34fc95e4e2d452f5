// Package qemu is the QEMU driver of vmm.Machine: it runs qemu-system-x86_64 with its monitor, console and virtio-serial ports on inherited socketpairs.
package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/vmm"

	"github.com/google/renameio/v2"
)

// DefaultBinary is the QEMU binary looked up on PATH.
const DefaultBinary = "qemu-system-x86_64"

const (
	consoleKeep = 64 << 10 // bytes of serial console kept for Console
	stderrKeep  = 16 << 10 // bytes of QEMU's stderr kept for errors
	errTail     = 1 << 10  // bytes of stderr/console quoted in errors
	closeGrace  = time.Second
	firstFD     = 3 // fd number of ExtraFiles[0] in QEMU
	sandboxOpts = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
)

// Fixed fd numbers in QEMU (index into ExtraFiles + firstFD).
const (
	qmpFD     = firstFD
	consoleFD = firstFD + 1
	portFD0   = firstFD + 2
)

// driver registers QEMU as the vmm driver "qemu".
type driver struct{}

func init() { vmm.Register(driver{}) }

func (driver) Name() string { return "qemu" }

func (driver) New(cfg vmm.Config) (vmm.Machine, error) { return New(cfg) }

// Machine is a QEMU virtual machine. Create it with New.
type Machine struct {
	cfg     vmm.Config
	binary  string
	accel   vmm.Accel
	cpu     string
	autoCPU bool // cpu was chosen by New, not by Config.CPU
	log     *slog.Logger

	console *ring
	stderr  *ring

	mu      sync.Mutex
	started bool
	closed  bool
	cmd     *exec.Cmd
	qmp     *qmpClient
	conns   []*net.UnixConn // every host end: qmp, console, ports
	ports   map[string]net.Conn

	closeOnce   sync.Once
	killed      atomic.Bool
	shutdown    atomic.Pointer[string] // reason of QMP SHUTDOWN event
	done        chan struct{}          // closed when QEMU exited (or never started and Close ran)
	waitErr     error                  // valid after done
	consoleDone chan struct{}
}

var _ vmm.Machine = (*Machine)(nil)

// New validates cfg and prepares a machine; no process runs until Start.
func New(cfg vmm.Config) (*Machine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := &Machine{
		cfg:     cfg,
		binary:  DefaultBinary,
		log:     cfg.Log,
		console: newRing(consoleKeep),
		stderr:  newRing(stderrKeep),
		done:    make(chan struct{}),
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if cfg.Binary != "" {
		m.binary = cfg.Binary
	}
	bin, err := exec.LookPath(m.binary)
	if err != nil {
		if m.binary == DefaultBinary {
			return nil, errors.New("qemu-system-x86_64 not found: install qemu-system-x86 (apt-get install qemu-system-x86)")
		}
		return nil, fmt.Errorf("qemu binary %s not usable (install qemu-system-x86 or fix the path): %w", m.binary, err)
	}
	m.binary = bin
	m.accel = cfg.Accel
	if m.accel == "" {
		var why string
		m.accel, why = vmm.DetectAccel()
		if why != "" {
			m.log.Info(why)
		}
	}
	m.cpu = cfg.CPU
	m.autoCPU = cfg.CPU == ""
	if m.cpu == "" {
		m.cpu = "max"
		if m.accel == vmm.KVM {
			m.cpu = "host"
		}
	}
	return m, nil
}

// Accel returns the accelerator the machine uses.
func (m *Machine) Accel() vmm.Accel { return m.accel }

// Pid returns QEMU's process id, or 0 before Start.
func (m *Machine) Pid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil || m.cmd.Process == nil {
		return 0
	}
	return m.cmd.Process.Pid
}

// The machine types (vmm.Config.Machine) as QEMU options.
const (
	// q35 without the devices a kiln guest never uses.
	q35Machine = "q35,sata=off,smbus=off,vmport=off,i8042=off"
	// microvm: no option ROMs, legacy PIC or PCIe. The ISA serial port
	// stays (the console); ACPI stays because it is how the guest powers
	// off (and finds the virtio-mmio devices); the PIT stays as the timer
	// the kernel calibrates its local APIC timer against; the RTC stays
	// because a kernel that finds no RTC waits a second for one.
	microvmMachine = "microvm,x-option-roms=off,pic=off,pcie=off,acpi=on"
)

// cmdline is Config.Cmdline plus what the machine needs from the guest
// kernel. A microvm under TCG has no HPET and no ACPI PM timer to
// calibrate the TSC against, and calibrating it against the emulated PIT
// fails on a busy host (the kernel then hangs): TCG's TSC counts at the
// host's TSC rate, so the guest is told that rate.
func (m *Machine) cmdline() string {
	c := m.cfg.Cmdline
	if m.cfg.Machine == vmm.MachineMicrovm && m.accel == vmm.TCG {
		if khz := hostTSCkHz(); khz > 0 {
			c = strings.TrimSpace(c + " tsc_early_khz=" + strconv.Itoa(khz) + " tsc=reliable")
		}
	}
	return c
}

var (
	tscOnce sync.Once
	tscKHz  int
)

// hostTSCkHz returns the host's TSC rate in kHz, or 0 when unknown (the
// host's TSC is not constant, or /proc/cpuinfo says nothing).
func hostTSCkHz() int {
	tscOnce.Do(func() {
		if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
			tscKHz = parseTSCkHz(b)
		}
	})
	return tscKHz
}

// parseTSCkHz derives the TSC rate from /proc/cpuinfo: on x86, with a
// constant TSC, the kernel's BogoMIPS are twice its TSC MHz (its delay
// loop counts TSC cycles), so kHz = bogomips × 500.
func parseTSCkHz(cpuinfo []byte) int {
	constant := false
	bogo := 0.0
	for _, line := range strings.Split(string(cpuinfo), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "flags":
			constant = slices.Contains(strings.Fields(v), "constant_tsc")
		case "bogomips":
			if bogo == 0 {
				bogo, _ = strconv.ParseFloat(strings.TrimSpace(v), 64)
			}
		}
		if constant && bogo > 0 {
			break
		}
	}
	if !constant || !(bogo >= 2) || bogo > 1e6 {
		return 0
	}
	return int(bogo*500 + 0.5)
}

// Args returns QEMU's full argv (argv[0] is the binary). Fds 3, 4 and 5…
// are the QMP, console and port sockets Start passes.
func (m *Machine) Args() []string {
	c := &m.cfg
	machine, blkDev, serialDev, fsDev := q35Machine, "virtio-blk-pci", "virtio-serial-pci", "virtio-9p-pci"
	if c.Machine == vmm.MachineMicrovm {
		machine, blkDev, serialDev, fsDev = microvmMachine, "virtio-blk-device", "virtio-serial-device", "virtio-9p-device"
	}
	if c.RAMFile != "" {
		machine += ",memory-backend=mem"
	}
	accel := string(m.accel)
	if m.accel == vmm.TCG && c.VCPUs > 1 {
		accel += ",thread=multi"
	}
	a := []string{
		m.binary,
		"-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
		"-machine", machine,
		"-accel", accel,
		"-cpu", m.cpu,
		"-m", strconv.Itoa(c.MemoryMiB) + "M",
		"-smp", strconv.Itoa(c.VCPUs),
	}
	if c.RAMFile != "" {
		a = append(a, "-object", jsonArg(map[string]any{
			"qom-type": "memory-backend-file",
			"id":       "mem",
			"size":     int64(c.MemoryMiB) << 20,
			"mem-path": c.RAMFile,
			"share":    c.RAMShared,
		}))
	}
	a = append(a, "-kernel", c.Kernel)
	if c.Initrd != "" {
		a = append(a, "-initrd", c.Initrd)
	}
	if cmdline := m.cmdline(); cmdline != "" {
		a = append(a, "-append", cmdline)
	}
	a = append(a,
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d", qmpFD),
		"-mon", "chardev=qmp,mode=control",
		"-chardev", fmt.Sprintf("socket,id=con,fd=%d", consoleFD),
		"-serial", "chardev:con",
	)
	if len(c.Ports) > 0 {
		a = append(a, "-device", jsonArg(map[string]any{"driver": serialDev, "id": "vser"}))
		for i, name := range c.Ports {
			id := "port" + strconv.Itoa(i)
			a = append(a,
				"-chardev", fmt.Sprintf("socket,id=%s,fd=%d", id, portFD0+i),
				"-device", jsonArg(map[string]any{
					"driver":  "virtserialport",
					"bus":     "vser.0",
					"nr":      i + 1,
					"chardev": id,
					"name":    name,
				}))
		}
	}
	for i, d := range c.Disks {
		node := "disk" + strconv.Itoa(i)
		raw := map[string]any{
			"driver":    "raw",
			"node-name": node,
			"read-only": d.ReadOnly,
			"file": map[string]any{
				"driver":    "file",
				"filename":  d.Path,
				"read-only": d.ReadOnly,
			},
		}
		if d.Offset != 0 {
			raw["offset"] = d.Offset
		}
		if d.Size != 0 {
			raw["size"] = d.Size
		}
		a = append(a,
			"-blockdev", jsonArg(raw),
			"-device", jsonArg(map[string]any{"driver": blkDev, "drive": node, "id": "vd" + strconv.Itoa(i)}))
	}
	for i, sh := range c.Shares {
		id := "fs" + strconv.Itoa(i)
		a = append(a,
			"-fsdev", fsdevArg(id, sh),
			"-device", jsonArg(map[string]any{"driver": fsDev, "fsdev": id, "mount_tag": sh.Tag}))
	}
	a = append(a, "-sandbox", sandboxOpts)
	if c.Incoming {
		a = append(a, "-incoming", "defer")
	}
	return a
}

// fsdevArg is the -fsdev option of a share (fsdev takes no JSON in 7.2;
// a comma in a value is written twice). The local backend walks paths
// with openat and O_NOFOLLOW, so a symlink inside the share is never
// followed on the host, and ".." at the share's root stays there.
// security_model=none: files are created with QEMU's own credentials
// (the user running kiln); as root, QEMU also applies the guest's
// chown, and failures to do so are ignored otherwise. multidevs=remap
// keeps inode numbers unique when the share spans host filesystems.
func fsdevArg(id string, sh vmm.Share) string {
	o := "local,id=" + id + ",path=" + strings.ReplaceAll(sh.Path, ",", ",,") + ",security_model=none,multidevs=remap"
	if sh.ReadOnly {
		o += ",readonly=on"
	}
	return o
}

// Fingerprint returns a digest of the machine as the guest sees it: the
// argv Start runs, with host paths, the RAM file's sharing mode and
// -incoming left out, so a snapshot source, its restores and a later
// process computing a snapshot key all agree.
func (m *Machine) Fingerprint() string {
	c := m.cfg
	const path = "<path>"
	c.Kernel = path
	if c.Initrd != "" {
		c.Initrd = path
	}
	if c.RAMFile != "" {
		c.RAMFile = path
	}
	c.RAMShared, c.Incoming = false, false
	c.Disks = slices.Clone(c.Disks)
	for i := range c.Disks {
		c.Disks[i].Path, c.Disks[i].Offset, c.Disks[i].Size = path, 0, 0
	}
	c.Shares = slices.Clone(c.Shares)
	for i := range c.Shares {
		c.Shares[i].Path, c.Shares[i].ReadOnly = path, false
	}
	n := &Machine{cfg: c, binary: "qemu", accel: m.accel, cpu: m.cpu}
	h := sha256.Sum256([]byte(strings.Join(n.Args(), "\x00")))
	return "qemu-" + hex.EncodeToString(h[:8])
}

var versions sync.Map // binary path → version line

// Version returns the first line of `qemu --version` of the machine's
// binary (cached per binary for the life of the process).
func (m *Machine) Version(ctx context.Context) (string, error) { return Version(ctx, m.binary) }

// Version runs `<binary> --version` and returns the first line of its
// output, e.g. "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)".
// Results are cached per binary path for the life of the process.
func Version(ctx context.Context, binary string) (string, error) {
	if v, ok := versions.Load(binary); ok {
		return v.(string), nil
	}
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, binary, "--version")
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return "", fmt.Errorf("running %s --version: %w (install qemu-system-x86)", binary, err)
		}
		return "", fmt.Errorf("running %s --version: %w: %s", binary, err, strings.TrimSpace(stderr.String()))
	}
	line, _, _ := strings.Cut(out.String(), "\n")
	line = strings.TrimSpace(line)
	if line == "" {
		return "", fmt.Errorf("running %s --version: no output", binary)
	}
	versions.Store(binary, line)
	return line, nil
}

// jsonArg encodes v for QEMU's JSON option syntax (-object, -device,
// -blockdev), which takes user paths verbatim, commas included.
func jsonArg(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("qemu: encoding option: %v", err)) // only maps of basic types
	}
	return string(b)
}

// socketpair returns a connected pair: the host end as a *net.UnixConn and
// the child end as an *os.File for exec.Cmd.ExtraFiles.
func socketpair(name string) (*net.UnixConn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("creating %s socketpair: %w", name, err)
	}
	hf := os.NewFile(uintptr(fds[0]), name+"-host")
	child := os.NewFile(uintptr(fds[1]), name+"-qemu")
	c, err := net.FileConn(hf) // dups
	hf.Close()
	if err != nil {
		child.Close()
		return nil, nil, fmt.Errorf("creating %s socketpair: %w", name, err)
	}
	return c.(*net.UnixConn), child, nil
}

// Start launches QEMU and returns once QMP is ready. ctx bounds only the
// start-up; when it ends first, QEMU is killed.
func (m *Machine) Start(ctx context.Context) (err error) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return fmt.Errorf("starting qemu: %w", vmm.ErrClosed)
	}
	if m.started {
		m.mu.Unlock()
		return errors.New("starting qemu: machine already started")
	}
	m.started = true
	m.mu.Unlock()
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("starting qemu: %w", err)
	}

	names := append([]string{"qmp", "console"}, m.cfg.Ports...)
	var childFiles []*os.File
	defer func() {
		for _, f := range childFiles {
			f.Close()
		}
	}()
	conns := make([]*net.UnixConn, 0, len(names))
	for _, n := range names {
		host, child, err := socketpair(n)
		if err != nil {
			m.mu.Lock()
			m.conns = conns
			m.mu.Unlock()
			return fmt.Errorf("starting qemu: %w", err)
		}
		conns = append(conns, host)
		childFiles = append(childFiles, child)
	}
	ports := make(map[string]net.Conn, len(m.cfg.Ports))
	for i, n := range m.cfg.Ports {
		ports[n] = conns[2+i]
	}

	args := m.Args()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.ExtraFiles = childFiles
	cmd.Stdout = m.stderr
	cmd.Stderr = m.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a terminal's Ctrl-C reaches kiln, which
		// then decides how to stop the VM.
		Setpgid: true,
		// Never outlive kiln. (Linux sends it when the forking OS thread
		// exits; the Go runtime does not retire threads that are not
		// locked, so in practice this is when kiln dies.)
		Pdeathsig: syscall.SIGKILL,
	}
	m.log.Debug("starting qemu", "args", args)

	m.mu.Lock()
	m.conns = conns
	if m.closed { // Close ran concurrently
		m.mu.Unlock()
		return fmt.Errorf("starting qemu: %w", vmm.ErrClosed)
	}
	if err := cmd.Start(); err != nil {
		m.mu.Unlock()
		return fmt.Errorf("starting qemu: %w", err)
	}
	m.cmd = cmd
	m.ports = ports
	m.consoleDone = make(chan struct{})
	m.qmp = newQMP(conns[0], m.log, m.onEvent)
	m.mu.Unlock()
	for _, f := range childFiles {
		f.Close()
	}
	childFiles = nil

	go m.readConsole(conns[1])
	go m.wait()

	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-m.done:
			cancel()
		case <-hctx.Done():
		}
	}()
	if err := m.qmp.handshake(hctx); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("starting qemu: %w", ctx.Err())
		}
		// QMP broke: QEMU is most likely exiting; prefer its exit status.
		select {
		case <-m.done:
			if m.cpuRefused() {
				return fmt.Errorf("starting qemu: %w (-cpu %s): %w", vmm.ErrCPUModel, m.cpu, m.waitErr)
			}
			return fmt.Errorf("starting qemu: %w", m.waitErr)
		case <-time.After(5 * time.Second):
		}
		return fmt.Errorf("starting qemu: %w%s", err, m.stderrTail())
	}
	return nil
}

// cpuRefused reports whether QEMU, having exited during start, refused
// the CPU model New chose ("host" under KVM: a host whose KVM cannot
// present its own CPU, such as some nested setups).
func (m *Machine) cpuRefused() bool {
	if !m.autoCPU || m.accel != vmm.KVM {
		return false
	}
	return cpuErrorRE.Match(m.stderr.Bytes())
}

// cpuErrorRE matches QEMU's complaints about a CPU model or its features.
var cpuErrorRE = regexp.MustCompile(`(?i)(-cpu|cpu model|cpu feature|host cpu|host doesn't support requested feature)`)

func (m *Machine) onEvent(ev Event) {
	if ev.Name != "SHUTDOWN" {
		return
	}
	var d struct {
		Reason string `json:"reason"`
	}
	json.Unmarshal(ev.Data, &d)
	m.shutdown.Store(&d.Reason)
}

// wait reaps QEMU and records why it exited.
func (m *Machine) wait() {
	err := m.cmd.Wait()
	// Let the QMP reader drain the SHUTDOWN event QEMU sent before exiting.
	select {
	case <-m.qmp.done:
	case <-time.After(2 * time.Second):
	}
	m.waitErr = m.exitError(err)
	if m.waitErr != nil {
		m.log.Debug("qemu exited", "err", m.waitErr)
	} else {
		m.log.Debug("qemu exited: guest powered off")
	}
	close(m.done)
}

func (m *Machine) exitError(err error) error {
	pid := m.cmd.Process.Pid
	if m.killed.Load() {
		return fmt.Errorf("qemu (pid %d) stopped: %w", pid, vmm.ErrClosed)
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				return fmt.Errorf("qemu (pid %d) killed by signal %s%s", pid, unix.SignalName(ws.Signal()), m.stderrTail())
			}
			return fmt.Errorf("qemu (pid %d) exited with status %d%s", pid, ee.ExitCode(), m.stderrTail())
		}
		return fmt.Errorf("qemu (pid %d): %w%s", pid, err, m.stderrTail())
	}
	reason := ""
	if r := m.shutdown.Load(); r != nil {
		reason = *r
	}
	switch reason {
	case "", "guest-shutdown":
		return nil
	case "guest-reset":
		return fmt.Errorf("guest rebooted (kernel panic or init exited?)%s%s", m.panicLine(), m.consoleTail())
	case "guest-panic":
		return fmt.Errorf("guest kernel panicked%s%s", m.panicLine(), m.consoleTail())
	default:
		return fmt.Errorf("qemu (pid %d) shut down: %s%s", pid, reason, m.stderrTail())
	}
}

func (m *Machine) stderrTail() string {
	b := strings.TrimSpace(string(tail(m.stderr.Bytes(), errTail)))
	if b == "" {
		return ""
	}
	return "; qemu stderr: " + b
}

func (m *Machine) consoleTail() string {
	b := strings.TrimSpace(string(tail(m.console.Bytes(), errTail)))
	if b == "" {
		return ""
	}
	return "; console: " + b
}

// panicLine returns ": <the console's last 'Kernel panic' line>" or "".
func (m *Machine) panicLine() string {
	c := m.console.Bytes()
	i := bytes.LastIndex(c, []byte("Kernel panic"))
	if i < 0 {
		return ""
	}
	line, _, _ := bytes.Cut(c[i:], []byte("\n"))
	return ": " + strings.TrimSpace(string(line))
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// readConsole copies the serial console into the ring buffer and the log.
func (m *Machine) readConsole(c *net.UnixConn) {
	defer close(m.consoleDone)
	buf := make([]byte, 8<<10)
	var line []byte
	for {
		n, err := c.Read(buf)
		if n > 0 {
			m.console.Write(buf[:n])
			line = append(line, buf[:n]...)
			for {
				i := bytes.IndexByte(line, '\n')
				if i < 0 {
					break
				}
				m.log.Debug("console", "line", strings.TrimRight(string(line[:i]), "\r"))
				line = line[i+1:]
			}
			if len(line) > 4<<10 {
				m.log.Debug("console", "line", string(line))
				line = nil
			}
		}
		if err != nil {
			if len(line) > 0 {
				m.log.Debug("console", "line", string(line))
			}
			return
		}
	}
}

// Port returns the host end of the named virtio-serial port, or nil.
func (m *Machine) Port(name string) net.Conn {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.ports[name]
	if !ok {
		return nil
	}
	return c
}

// Wait blocks until QEMU exits. It returns nil for a guest power-off, an
// error wrapping vmm.ErrClosed after Close, and otherwise an error with the
// exit status and the tail of QEMU's stderr (or of the console for a guest
// reboot, which with -no-reboot means a panic).
func (m *Machine) Wait() error {
	<-m.done
	return m.waitErr
}

// Done is closed when QEMU has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Console returns the last 64 KiB of the serial console.
func (m *Machine) Console() []byte { return m.console.Bytes() }

// Close stops QEMU (SIGTERM, then SIGKILL after a grace period) and closes
// every socket. It is idempotent and safe to call concurrently with Wait.
func (m *Machine) Close() error {
	m.closeOnce.Do(func() {
		m.mu.Lock()
		m.closed = true
		cmd := m.cmd
		conns := m.conns
		m.mu.Unlock()
		if cmd == nil {
			m.waitErr = fmt.Errorf("qemu not running: %w", vmm.ErrClosed)
			close(m.done)
			for _, c := range conns {
				c.Close()
			}
			return
		}
		select {
		case <-m.done:
		default:
			m.killed.Store(true)
			cmd.Process.Signal(syscall.SIGTERM)
			t := time.NewTimer(closeGrace)
			select {
			case <-m.done:
			case <-t.C:
				m.log.Debug("qemu ignored SIGTERM: killing it", "pid", cmd.Process.Pid)
				cmd.Process.Kill()
				<-m.done
			}
			t.Stop()
		}
		for _, c := range conns {
			c.Close()
		}
		<-m.qmp.done
		<-m.consoleDone
	})
	return nil
}

// qmpReady returns the QMP client of a started, running machine.
func (m *Machine) qmpReady() (*qmpClient, error) {
	m.mu.Lock()
	q, closed := m.qmp, m.closed
	m.mu.Unlock()
	switch {
	case closed:
		return nil, vmm.ErrClosed
	case q == nil:
		return nil, errors.New("machine not started")
	}
	select {
	case <-m.done:
		return nil, fmt.Errorf("qemu exited: %w", m.waitErr)
	default:
	}
	return q, nil
}

type migrationInfo struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

func setIgnoreShared(ctx context.Context, q *qmpClient) error {
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
	return q.Execute(ctx, "migrate-set-capabilities", caps, nil)
}

// SaveState migrates the device state (and any RAM not in a shared
// RAMFile) to path, written atomically, and leaves the VM paused. With a
// shared RAMFile the guest RAM lives in that file; SaveState does not fsync
// it.
func (m *Machine) SaveState(ctx context.Context, path string) (err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("saving vm state: %w", err)
		}
	}()
	q, err := m.qmpReady()
	if err != nil {
		return err
	}
	f, err := renameio.NewPendingFile(path, renameio.WithTempDir(filepath.Dir(path)))
	if err != nil {
		return err
	}
	defer f.Cleanup()
	if err := setIgnoreShared(ctx, q); err != nil {
		return err
	}
	// Not throttled: the default 32 MiB/s would make a save without a
	// shared RAMFile take ages.
	if err := q.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return err
	}
	const fdName = "kiln-save"
	if err := q.ExecuteFD(ctx, "getfd", map[string]any{"fdname": fdName}, nil, int(f.Fd())); err != nil {
		return err
	}
	if err := q.Execute(ctx, "migrate", map[string]any{"uri": "fd:" + fdName}, nil); err != nil {
		q.Execute(context.WithoutCancel(ctx), "closefd", map[string]any{"fdname": fdName}, nil)
		return err
	}
	if err := m.pollMigration(ctx, q, func(st string) bool { return st == "completed" }); err != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		q.Execute(cctx, "migrate_cancel", nil, nil)
		cancel()
		return err
	}
	if err := f.CloseAtomicallyReplace(); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// pollMigration polls query-migrate until done(status) is true, the
// migration fails, QEMU exits or ctx ends.
func (m *Machine) pollMigration(ctx context.Context, q *qmpClient, done func(string) bool) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		var info migrationInfo
		if err := q.Execute(ctx, "query-migrate", nil, &info); err != nil {
			return m.exitedOr(err)
		}
		switch {
		case done(info.Status):
			return nil
		case info.Status == "failed" || info.Status == "cancelled":
			return fmt.Errorf("migration %s: %s", info.Status, info.ErrorDesc)
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("waiting for migration (status %q): %w", info.Status, ctx.Err())
		case <-m.done:
			return fmt.Errorf("qemu exited during migration: %w", m.waitErr)
		}
	}
}

// exitedOr prefers QEMU's exit error over err when QEMU has exited.
func (m *Machine) exitedOr(err error) error {
	select {
	case <-m.done:
		return fmt.Errorf("qemu exited: %w", m.waitErr)
	case <-time.After(50 * time.Millisecond):
		return err
	}
}

// LoadState restores the state saved by SaveState into a machine started
// with Config.Incoming and returns once the guest runs again.
func (m *Machine) LoadState(ctx context.Context, path string) (err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("loading vm state: %w", err)
		}
	}()
	if !m.cfg.Incoming {
		return errors.New("machine not started with Config.Incoming")
	}
	q, err := m.qmpReady()
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	resumed, unsubscribe := q.subscribe("RESUME")
	defer unsubscribe()
	if err := setIgnoreShared(ctx, q); err != nil {
		return m.exitedOr(err)
	}
	const fdName = "kiln-load"
	if err := q.ExecuteFD(ctx, "getfd", map[string]any{"fdname": fdName}, nil, int(f.Fd())); err != nil {
		return m.exitedOr(err)
	}
	if err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + fdName}, nil); err != nil {
		q.Execute(context.WithoutCancel(ctx), "closefd", map[string]any{"fdname": fdName}, nil)
		return m.exitedOr(err)
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-resumed:
			return nil
		case <-m.done:
			return fmt.Errorf("qemu exited: %w", m.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("waiting for the guest to resume: %w", ctx.Err())
		case <-t.C:
		}
		var info migrationInfo
		if err := q.Execute(ctx, "query-migrate", nil, &info); err != nil {
			return m.exitedOr(err)
		}
		switch info.Status {
		case "failed", "cancelled":
			return fmt.Errorf("incoming migration %s: %s%s", info.Status, info.ErrorDesc, m.stderrTail())
		case "completed":
			var st struct {
				Status string `json:"status"`
			}
			if err := q.Execute(ctx, "query-status", nil, &st); err != nil {
				return m.exitedOr(err)
			}
			switch st.Status {
			case "running":
				return nil
			case "paused": // the source was paused when saved
				if err := q.Execute(ctx, "cont", nil, nil); err != nil {
					return m.exitedOr(err)
				}
			}
		}
	}
}

// ring keeps the last max bytes written to it.
type ring struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func newRing(max int) *ring { return &ring{max: max} }

func (r *ring) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(p) >= r.max {
		r.buf = append(r.buf[:0], p[len(p)-r.max:]...)
		return len(p), nil
	}
	r.buf = append(r.buf, p...)
	if len(r.buf) > 2*r.max {
		n := copy(r.buf, r.buf[len(r.buf)-r.max:])
		r.buf = r.buf[:n]
	}
	return len(p), nil
}

// Bytes returns a copy of the last max bytes.
func (r *ring) Bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), tail(r.buf, r.max)...)
}

var _ io.Writer = (*ring)(nil)
