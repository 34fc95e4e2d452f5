package vmm

import (
	"fmt"
	"slices"
	"sort"
	"sync"
)

// Driver makes machines of one VMM. Drivers register themselves with
// Register from an init function; package vmm/drivers links them all, so
// callers choose a driver by name and never import one.
type Driver interface {
	// Name is the driver's registered name, such as "qemu".
	Name() string
	// New validates cfg and prepares a machine; no process runs until
	// Machine.Start.
	New(cfg Config) (Machine, error)
}

// DefaultDriver is the driver used when none is named.
const DefaultDriver = "qemu"

var (
	driversMu sync.RWMutex
	drivers   = map[string]Driver{}
)

// Register makes a driver available by its name. It panics when the name
// is taken, as a second registration is a programming error.
func Register(d Driver) {
	driversMu.Lock()
	defer driversMu.Unlock()
	if _, dup := drivers[d.Name()]; dup {
		panic("vmm: driver " + d.Name() + " registered twice")
	}
	drivers[d.Name()] = d
}

// Lookup returns the driver called name ("" is DefaultDriver).
func Lookup(name string) (Driver, error) {
	if name == "" {
		name = DefaultDriver
	}
	driversMu.RLock()
	defer driversMu.RUnlock()
	if d, ok := drivers[name]; ok {
		return d, nil
	}
	return nil, fmt.Errorf("unknown VMM driver %q (available: %v)", name, driverNames())
}

// Drivers lists the registered driver names, sorted.
func Drivers() []string {
	driversMu.RLock()
	defer driversMu.RUnlock()
	return driverNames()
}

func driverNames() []string {
	var names []string
	for n := range drivers {
		names = append(names, n)
	}
	sort.Strings(names)
	return slices.Clip(names)
}
