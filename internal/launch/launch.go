// Package launch boots a kiln image as a VM and speaks to its init over the control port.
//
// It joins the pieces of the data path: it opens and verifies the image,
// extracts the kernel and initramfs to the cache, configures a vmm.Machine
// with the rootfs attached read-only as a byte range of the image file, and
// performs the Hello/Config handshake with kiln-init. Callers then either wait
// for a command's exit (run mode, RunCommand) or talk to the agent port
// (serve mode, used by package sandbox).
package launch

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/vmm"
	"github.com/kiln-dev/kiln/internal/vmm/qemu"
)

// Port names of the virtio-serial channels, shared with kiln-init.
const (
	CtlPort   = "kiln.ctl"
	AgentPort = "kiln.agent"
)

// Cmdline is the kernel command line of every kiln VM.
const Cmdline = "console=ttyS0 panic=-1 loglevel=3 quiet random.trust_cpu=on"

// Options tune a boot. The zero value boots with the image's defaults.
type Options struct {
	MemoryMiB int // 0: the image's memory
	VCPUs     int // 0: the image's vcpus
	Accel     vmm.Accel
	Log       *slog.Logger
	// RAMFile, RAMShared and Incoming are passed to vmm.Config for
	// snapshots; see package snapshot.
	RAMFile   string
	RAMShared bool
	Incoming  bool
	// QEMU overrides the qemu-system-x86_64 binary.
	QEMU string
}

func (o *Options) logger() *slog.Logger {
	if o.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Log
}

// Open opens an image and verifies every part's digest before it is booted.
func Open(path string) (*image.Image, error) {
	img, err := image.Open(path)
	if err != nil {
		return nil, err
	}
	if err := img.Verify(); err != nil {
		return nil, err
	}
	return img, nil
}

// MachineConfig returns the VMM configuration that boots img.
func MachineConfig(img *image.Image, o Options) (vmm.Config, error) {
	kernel, initrd, err := img.BootFiles()
	if err != nil {
		return vmm.Config{}, fmt.Errorf("extracting kernel and initramfs: %w", err)
	}
	root, ok := img.Part(image.PartRootfs)
	if !ok {
		return vmm.Config{}, fmt.Errorf("image %s has no rootfs part: %w", img.Path, image.ErrCorrupt)
	}
	mem, cpus := img.Manifest.MemoryMiB, img.Manifest.VCPUs
	if o.MemoryMiB > 0 {
		mem = o.MemoryMiB
	}
	if o.VCPUs > 0 {
		cpus = o.VCPUs
	}
	return vmm.Config{
		Kernel:    kernel,
		Initrd:    initrd,
		Cmdline:   Cmdline,
		MemoryMiB: mem,
		VCPUs:     cpus,
		Accel:     o.Accel,
		Disks:     []vmm.Disk{{Path: img.Path, Offset: root.Offset, Size: root.Size, ReadOnly: true}},
		Ports:     []string{CtlPort, AgentPort},
		RAMFile:   o.RAMFile,
		RAMShared: o.RAMShared,
		Incoming:  o.Incoming,
		Log:       o.logger(),
	}, nil
}

// Timings are the host-observed phases of one VM's life. Zero values mean
// the phase was not reached.
type Timings struct {
	Start          time.Time     // launch began (before the VMM process)
	VMMStarted     time.Duration // VMM process running, monitor connected
	KernelStarted  time.Duration // estimated: init's Hello arrival minus the guest uptime it reports
	InitStarted    time.Duration // init's Hello arrived
	RootfsMounted  time.Duration
	CommandStarted time.Duration
	CommandExited  time.Duration
	StateLoaded    time.Duration // restore: device state loaded and the guest resumed (QMP RESUME)
	Reseeded       time.Duration // restore: the clone has fresh entropy and the host's clock
	FirstResult    time.Duration // sandbox: the first result arrived
}

// Phases lists the reached phases in order, as name/duration pairs.
func (t Timings) Phases() []Phase {
	all := []Phase{
		{"vmm_started", t.VMMStarted}, {"kernel_started", t.KernelStarted},
		{"init_started", t.InitStarted}, {"rootfs_mounted", t.RootfsMounted},
		{"command_started", t.CommandStarted}, {"command_exited", t.CommandExited},
		{"state_loaded_resumed", t.StateLoaded}, {"reseeded", t.Reseeded}, {"first_result", t.FirstResult},
	}
	var out []Phase
	for _, p := range all {
		if p.Since > 0 {
			out = append(out, p)
		}
	}
	return out
}

// Phase is one named point in time since Timings.Start.
type Phase struct {
	Name  string        `json:"name"`
	Since time.Duration `json:"since_ns"`
}

// VM is a booted (or restored) image. Its methods are not safe for
// concurrent use except Close, which may be called at any time from any
// goroutine and makes blocked calls return.
type VM struct {
	Image   *image.Image
	Machine vmm.Machine
	Timings Timings
	log     *slog.Logger

	ctl  net.Conn
	ctlR *proto.Reader

	closeOnce sync.Once
	closeErr  error
}

// Boot starts a VM for img and sends cfg to its init. It returns once init
// has received the configuration; the command or agent is starting then.
// On error every resource is released.
func Boot(ctx context.Context, img *image.Image, cfg proto.RunConfig, o Options) (_ *VM, err error) {
	vm, err := start(ctx, img, o)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			vm.Close()
		}
	}()
	if err := vm.handshake(ctx, cfg); err != nil {
		return nil, err
	}
	return vm, nil
}

// Start launches the VMM for img without talking to the guest; used by
// restores, where init is already past its handshake.
func Start(ctx context.Context, img *image.Image, o Options) (*VM, error) {
	return start(ctx, img, o)
}

func start(ctx context.Context, img *image.Image, o Options) (*VM, error) {
	t0 := time.Now()
	mc, err := MachineConfig(img, o)
	if err != nil {
		return nil, err
	}
	var opts []qemu.Option
	if o.QEMU != "" {
		opts = append(opts, qemu.WithBinary(o.QEMU))
	}
	m, err := qemu.New(mc, opts...)
	if err != nil {
		return nil, err
	}
	if err := m.Start(ctx); err != nil {
		m.Close()
		return nil, fmt.Errorf("starting VM: %w", err)
	}
	vm := &VM{Image: img, Machine: m, log: o.logger(), ctl: m.Port(CtlPort)}
	vm.ctlR = proto.NewReader(vm.ctl, 1<<20)
	vm.Timings.Start = t0
	vm.Timings.VMMStarted = time.Since(t0)
	return vm, nil
}

// Entropy returns n fresh random bytes for seeding a guest.
func Entropy(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func (vm *VM) handshake(ctx context.Context, cfg proto.RunConfig) error {
	stop := vm.closeOnDone(ctx)
	defer stop()
	for {
		f, err := vm.ctlR.Next()
		if err != nil {
			return vm.deathError("waiting for the guest init", err)
		}
		switch f.Type {
		case proto.Hello:
			vm.Timings.InitStarted = time.Since(vm.Timings.Start)
			var h proto.HelloMsg
			if err := decodeJSON(f, &h); err == nil && h.UptimeMS > 0 {
				k := vm.Timings.InitStarted - time.Duration(h.UptimeMS*float64(time.Millisecond))
				if k > 0 {
					vm.Timings.KernelStarted = k
				}
			}
			if cfg.Entropy == nil {
				cfg.Entropy = Entropy(64)
			}
			if cfg.TimeNS == 0 {
				cfg.TimeNS = time.Now().UnixNano()
			}
			if err := proto.WriteJSON(vm.ctl, proto.Config, cfg); err != nil {
				return vm.deathError("sending the run configuration", err)
			}
			return nil
		case proto.Log:
			vm.log.Debug("guest", "line", string(f.Payload))
		default:
			vm.log.Debug("unexpected frame before hello", "type", f.Type)
		}
	}
}

// closeOnDone closes the VM when ctx ends, so blocked reads return. The
// returned func stops the watch.
func (vm *VM) closeOnDone(ctx context.Context) (stop func()) {
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			vm.Close()
		case <-done:
		}
	}()
	return func() { close(done) }
}

// Exit is how a run-mode command ended.
type Exit = proto.ExitMsg

// RunCommand relays the command's output to stdout and stderr until it
// exits, then waits for the VM to power off. When ctx ends first the VM is
// killed and ctx's error is returned.
func (vm *VM) RunCommand(ctx context.Context, stdout, stderr io.Writer) (Exit, error) {
	stop := vm.closeOnDone(ctx)
	defer stop()
	for {
		f, err := vm.ctlR.Next()
		if err != nil {
			if ctx.Err() != nil {
				return Exit{}, ctx.Err()
			}
			return Exit{}, vm.deathError("running the command", err)
		}
		switch f.Type {
		case proto.Stdout:
			_, _ = stdout.Write(f.Payload)
		case proto.Stderr:
			_, _ = stderr.Write(f.Payload)
		case proto.Log:
			vm.log.Debug("guest", "line", string(f.Payload))
		case proto.Event:
			vm.event(f)
		case proto.Exit:
			var e Exit
			if err := decodeJSON(f, &e); err != nil {
				return Exit{}, err
			}
			if vm.Timings.CommandExited == 0 {
				vm.Timings.CommandExited = time.Since(vm.Timings.Start)
			}
			select {
			case <-vm.Machine.Done():
			case <-time.After(10 * time.Second):
				vm.log.Warn("guest did not power off after the command exited; killing it")
			case <-ctx.Done():
			}
			return e, nil
		}
	}
}

func (vm *VM) event(f proto.Frame) {
	var e proto.EventMsg
	if decodeJSON(f, &e) != nil {
		return
	}
	d := time.Since(vm.Timings.Start)
	switch e.Phase {
	case proto.PhaseRootfsMounted:
		vm.Timings.RootfsMounted = d
	case proto.PhaseCommandStarted:
		vm.Timings.CommandStarted = d
	case proto.PhaseCommandExited:
		vm.Timings.CommandExited = d
	}
}

// Ctl returns the control port reader and connection, for callers (package
// sandbox) that take over the control channel after Boot.
func (vm *VM) Ctl() (*proto.Reader, net.Conn) { return vm.ctlR, vm.ctl }

// deathError explains why the guest stopped talking: a VMM exit (with the
// console tail, which holds kernel panics) or a closed channel.
func (vm *VM) deathError(doing string, err error) error {
	select {
	case <-vm.Machine.Done():
		werr := vm.Machine.Wait()
		return fmt.Errorf("%s: the VM exited (%v)%s", doing, werr, consoleTail(vm.Machine.Console()))
	case <-time.After(2 * time.Second):
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("%s: the guest closed its channel%s", doing, consoleTail(vm.Machine.Console()))
	}
	return fmt.Errorf("%s: %w", doing, err)
}

func consoleTail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if s == "" {
		return ""
	}
	lines := strings.Split(s, "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "; last console lines:\n  " + strings.Join(lines, "\n  ")
}

// ConsoleTail formats the last lines of a VM console for an error message.
func ConsoleTail(b []byte) string { return consoleTail(b) }

// Close kills the VM and releases its resources. It is idempotent.
func (vm *VM) Close() error {
	vm.closeOnce.Do(func() {
		vm.closeErr = vm.Machine.Close()
	})
	return vm.closeErr
}
