package endpoint

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/kiln-dev/kiln/internal/endpoint/slurm"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/vm"
)

// FileConfig is the TOML config file of kiln serve (kiln serve --config),
// with sizes and durations as people write them; flags given on the
// command line win over it. Config turns it into a Config.
type FileConfig struct {
	Listen         string `toml:"listen"`
	Images         string `toml:"images"`
	State          string `toml:"state"`
	MaxVMs         int    `toml:"max_vms"`
	MaxMemory      string `toml:"max_memory"`
	PoolMax        int    `toml:"pool_max"`
	MinIdle        int    `toml:"min_idle"`
	IdleTimeout    string `toml:"idle_timeout"`
	MaxQueued      int    `toml:"max_queued"`
	MaxBody        string `toml:"max_body"`
	ResultTTL      string `toml:"result_ttl"`
	ShutdownGrace  string `toml:"shutdown_grace"`
	InsecureNoAuth bool   `toml:"insecure_no_auth"`
	// Provider: "local" (default), "slurm" or "workers" (see Providers).
	Provider string `toml:"provider"`
	// Advertise is the URL workers reach the endpoint at (default: the
	// listen address, with this host's name for 0.0.0.0 or [::]).
	Advertise string       `toml:"advertise"`
	Slurm     slurm.Config `toml:"slurm"`
	// Volumes are host directories mounted into every VM of the endpoint
	// (HOST:GUEST[:ro|:rw], read-only by default), as kiln serve --volume.
	Volumes []string `toml:"volumes"`
}

// LoadFileConfig reads a config file strictly: an unknown key is an error
// that names it, with its position.
func LoadFileConfig(path string) (FileConfig, error) {
	var c FileConfig
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("reading config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		var sm *toml.StrictMissingError
		if errors.As(err, &sm) {
			return c, fmt.Errorf("config %s: unknown keys:\n%s", path, sm.String())
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return c, fmt.Errorf("config %s:%d:%d: %v", path, row, col, de)
		}
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Config returns the endpoint configuration the file (and flags) describe.
// Log and the rest of VM (beyond Volumes) are the caller's to set.
func (c *FileConfig) Config() (Config, error) {
	cfg := Config{
		ImagesDir: c.Images, StateDir: c.State, NoAuth: c.InsecureNoAuth,
		MaxVMs: c.MaxVMs, PoolMax: c.PoolMax, MinIdle: c.MinIdle, MaxQueued: c.MaxQueued,
		Provider: c.Provider, Slurm: c.Slurm,
	}
	if c.Provider != "" && !slices.Contains(Providers, c.Provider) {
		return cfg, fmt.Errorf("provider = %q: want one of %s", c.Provider, strings.Join(Providers, ", "))
	}
	if c.Provider == ProviderSlurm {
		if err := cfg.Slurm.Validate(); err != nil {
			return cfg, err
		}
	}
	for _, s := range c.Volumes {
		v, err := vm.ParseVolume(s)
		if err != nil {
			return cfg, fmt.Errorf("--volume %s: %w", s, err)
		}
		cfg.VM.Volumes = append(cfg.VM.Volumes, v)
	}
	if n := len(cfg.VM.Volumes); n > proto.VolumeSlots {
		return cfg, fmt.Errorf("%d volumes: a VM takes at most %d", n, proto.VolumeSlots)
	}
	if cfg.StateDir == "" {
		d, err := DefaultStateDir()
		if err != nil {
			return cfg, err
		}
		cfg.StateDir = d
	}
	if c.Images != "" {
		if st, err := os.Stat(c.Images); err != nil || !st.IsDir() {
			return cfg, fmt.Errorf("--images %s: not a directory (give the directory that holds the .kimg files)", c.Images)
		}
	}
	if c.MaxVMs < 0 || c.PoolMax < 0 || c.MinIdle < 0 || c.MaxQueued < 0 {
		return cfg, errors.New("--max-vms, --pool-max, --min-idle and --max-queued must not be negative")
	}
	var err error
	dur := func(name, v string, dst *time.Duration) {
		if err != nil || v == "" {
			return
		}
		d, perr := time.ParseDuration(v)
		if perr != nil || d < 0 {
			err = fmt.Errorf("--%s %q: want a duration such as 30s or 10m", name, v)
			return
		}
		*dst = d
	}
	dur("idle-timeout", c.IdleTimeout, &cfg.IdleTimeout)
	dur("result-ttl", c.ResultTTL, &cfg.ResultTTL)
	dur("shutdown-grace", c.ShutdownGrace, &cfg.ShutdownGrace)
	if err != nil {
		return cfg, err
	}
	if c.MaxMemory != "" {
		n, err := size.Parse(c.MaxMemory)
		if err != nil {
			return cfg, fmt.Errorf("--max-memory: %w", err)
		}
		cfg.MaxMemoryMiB = int(n >> 20)
	}
	if c.MaxBody != "" {
		n, err := size.Parse(c.MaxBody)
		if err != nil {
			return cfg, fmt.Errorf("--max-body: %w", err)
		}
		cfg.MaxBody = int64(n)
	}
	return cfg, nil
}
