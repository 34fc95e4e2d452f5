// Command guestinit is a tiny PID 1 for the qemu driver's boot tests; the
// kernel passes its mode as the environment variable kilntest.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

func main() {
	mode := os.Getenv("kilntest")
	fmt.Printf("guestinit: mode %s\n", mode)
	switch mode {
	case "poweroff":
		fmt.Println("guestinit: hello")
	case "devices":
		if err := devices(); err != nil {
			fmt.Printf("guestinit: error: %v\n", err)
		}
	case "ping":
		for {
			fmt.Println("ping")
			time.Sleep(200 * time.Millisecond)
		}
	case "counter":
		var b [8]byte
		f, _ := os.Open("/dev/urandom")
		if f != nil {
			f.Read(b[:])
		}
		token := hex.EncodeToString(b[:])
		for i := 0; ; i++ {
			fmt.Printf("count %d token %s\n", i, token)
			time.Sleep(100 * time.Millisecond)
		}
	case "panic":
		fmt.Println("guestinit: exiting on purpose")
		os.Exit(3)
	default:
		fmt.Println("guestinit: unknown mode")
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// devices loads the virtio modules, echoes a line on the kiln.ctl port with
// the size and sha256 of /dev/vda appended, and returns.
func devices() error {
	os.MkdirAll("/dev", 0o755)
	os.MkdirAll("/sys", 0o755)
	if err := syscall.Mount("devtmpfs", "/dev", "devtmpfs", 0, ""); err != nil && err != syscall.EBUSY {
		return fmt.Errorf("mounting devtmpfs: %w", err)
	}
	if err := syscall.Mount("sysfs", "/sys", "sysfs", 0, ""); err != nil {
		return fmt.Errorf("mounting sysfs: %w", err)
	}
	list, err := os.ReadFile("/modules.list")
	if err != nil {
		return err
	}
	for _, p := range strings.Fields(string(list)) {
		if err := loadModule(p); err != nil {
			return fmt.Errorf("loading %s: %w", p, err)
		}
	}
	port, err := waitFor(func() (string, bool) {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			b, _ := os.ReadFile(n)
			if strings.TrimSpace(string(b)) == "kiln.ctl" {
				return "/dev/" + filepath.Base(filepath.Dir(n)), true
			}
		}
		return "", false
	})
	if err != nil {
		return fmt.Errorf("port kiln.ctl: %w", err)
	}
	disk, err := waitFor(func() (string, bool) {
		_, err := os.Stat("/dev/vda")
		return "/dev/vda", err == nil
	})
	if err != nil {
		return fmt.Errorf("/dev/vda: %w", err)
	}
	d, err := os.Open(disk)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(h, d)
	d.Close()
	if err != nil {
		return fmt.Errorf("reading %s: %w", disk, err)
	}
	p, err := os.OpenFile(port, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer p.Close()
	line, err := bufio.NewReader(p).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading %s: %w", port, err)
	}
	_, err = fmt.Fprintf(p, "echo %s disk %d %x\n", strings.TrimSpace(line), n, h.Sum(nil))
	return err
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	params := []byte{0}
	_, _, e := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&params[0])), 0)
	if e != 0 && e != syscall.EEXIST {
		return e
	}
	return nil
}

func waitFor(f func() (string, bool)) (string, error) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if s, ok := f(); ok {
			return s, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "", fmt.Errorf("timed out")
}

const sysFinitModule = 313 // x86_64
