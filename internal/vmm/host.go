package vmm

import (
	"bufio"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// HostMemoryMiB returns the host's total RAM (MemTotal), or 0 when unknown.
func HostMemoryMiB() int {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[0] == "MemTotal:" {
			kb, _ := strconv.Atoi(fs[1])
			return kb / 1024
		}
	}
	return 0
}

// HostCPUs returns the number of CPUs kiln may use.
func HostCPUs() int { return runtime.NumCPU() }
