// Package simfs mounts a FUSE passthrough filesystem that models a shared filesystem (Lustre, GPFS) by injecting latency into metadata operations and data reads and counting every operation by kind.
//
// It is a model, not a shared filesystem: the data lives on the local disk
// under the backing directory, and the only thing that makes it "shared" is
// the latency it adds. Params describe the model; print them next to every
// result. The mount disables the kernel's attribute, entry and negative-entry
// caches (timeouts 0), so every path lookup and stat really reaches the model.
package simfs

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Params are the model's parameters.
type Params struct {
	// Name labels the parameter set ("lustre-idle", or "custom").
	Name string `json:"name"`
	// Meta is added to every metadata operation (lookup, getattr, open,
	// opendir, readdir, readlink, access, statfs, getxattr, create, …).
	Meta time.Duration `json:"meta_ns"`
	// Read is added to every data read request.
	Read time.Duration `json:"read_ns"`
	// BandwidthMBps caps the data read rate of the whole mount, in MB/s
	// (10^6 bytes per second); 0 means no cap.
	BandwidthMBps float64 `json:"bandwidth_mbps"`
}

// String is the compact form ParseParams reads, with the name first:
// "lustre-idle: meta=500µs read=300µs bw=1000MB/s".
func (p Params) String() string {
	bw := "unlimited"
	if p.BandwidthMBps > 0 {
		bw = strconv.FormatFloat(p.BandwidthMBps, 'f', -1, 64) + "MB/s"
	}
	name := p.Name
	if name == "" {
		name = "custom"
	}
	return fmt.Sprintf("%s: meta=%s read=%s bw=%s", name, p.Meta, p.Read, bw)
}

// WithMeta returns p with the metadata latency replaced and the name
// marking the change ("lustre-idle@meta=1ms").
func (p Params) WithMeta(d time.Duration) Params {
	base := p.Name
	if i := strings.IndexByte(base, '@'); i >= 0 {
		base = base[:i]
	}
	p.Name = base + "@meta=" + d.String()
	p.Meta = d
	return p
}

// Presets are the named parameter sets. The sources of each number are in
// docs/benchmarks.md.
var Presets = map[string]Params{
	// local: the FUSE passthrough alone, no injected latency: what the
	// model costs by itself.
	"local": {Name: "local"},
	// lustre-idle: ~0.5 ms per metadata RPC (single-client mdtest stat rate
	// of about 2,000 ops/s on an idle Lustre 2.5 system), a small per-read
	// request cost and a 1 GB/s client link.
	"lustre-idle": {Name: "lustre-idle", Meta: 500 * time.Microsecond, Read: 300 * time.Microsecond, BandwidthMBps: 1000},
	// lustre-busy: 10 ms per metadata RPC, the order reported when the
	// metadata server is saturated by many clients, and a shared, slower
	// data path.
	"lustre-busy": {Name: "lustre-busy", Meta: 10 * time.Millisecond, Read: 2 * time.Millisecond, BandwidthMBps: 200},
}

// PresetNames lists the presets in a stable order.
func PresetNames() []string {
	var names []string
	for n := range Presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// ParseParams reads a preset name, or a comma- or space-separated list of
// key=value settings applied to the "local" preset (or to a preset named
// first): "lustre-idle", "meta=1ms,read=200us,bw=500",
// "lustre-busy,meta=20ms". Keys: meta, read (Go durations; a bare number is
// milliseconds) and bw (MB/s; 0 is unlimited).
func ParseParams(s string) (Params, error) {
	fields := strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
	if len(fields) == 0 {
		return Params{}, errors.New("empty filesystem model: give a preset (" + strings.Join(PresetNames(), ", ") + ") or meta=…,read=…,bw=…")
	}
	p := Presets["local"]
	custom := false
	for i, f := range fields {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			pp, found := Presets[f]
			if !found || i > 0 {
				return Params{}, fmt.Errorf("unknown filesystem model %q: want one of %s first, then key=value settings", f, strings.Join(PresetNames(), ", "))
			}
			p = pp
			continue
		}
		custom = true
		switch k {
		case "meta", "read":
			d, err := parseDuration(v)
			if err != nil {
				return Params{}, fmt.Errorf("%s=%q: %w", k, v, err)
			}
			if k == "meta" {
				p.Meta = d
			} else {
				p.Read = d
			}
		case "bw":
			x, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSuffix(v, "MB/s"), "MBps"), 64)
			if err != nil || x < 0 || x != x || x > 1e9 {
				return Params{}, fmt.Errorf("bw=%q: want a bandwidth in MB/s, 0 for unlimited", v)
			}
			p.BandwidthMBps = x
		default:
			return Params{}, fmt.Errorf("unknown filesystem model setting %q: want meta, read or bw", k)
		}
	}
	if custom {
		p.Name = "custom"
	}
	return p, nil
}

func parseDuration(v string) (time.Duration, error) {
	if x, err := strconv.ParseFloat(v, 64); err == nil {
		if x < 0 || x > 60e3 || x != x {
			return 0, errors.New("want a duration between 0 and 60s")
		}
		return time.Duration(x * float64(time.Millisecond)), nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, errors.New("want a duration such as 1ms or 200us")
	}
	if d < 0 || d > time.Minute {
		return 0, errors.New("want a duration between 0 and 60s")
	}
	return d, nil
}
