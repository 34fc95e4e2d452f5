package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/endpoint"
	"github.com/kiln-dev/kiln/internal/endpoint/slurm"
	"github.com/kiln-dev/kiln/internal/guest/proto"
)

func newServeCmd(a *app) *cobra.Command {
	var configPath string
	var c endpoint.FileConfig
	cmd := &cobra.Command{
		Use:   "serve [--images DIR] [--listen ADDR]",
		Short: "Serve registered functions over HTTP from pools of warm VMs",
		Long: `Serve runs a function-serving endpoint (API in docs/api.md). Clients register
a function (source, pickle or module:function) with the image it runs in,
submit tasks, and fetch results; each task runs in a warm VM of its image's
pool. Queued tasks and results live in SQLite in the state directory and
survive restarts.

Images are the files in --images DIR, named without their .kimg suffix.
The state directory (--state, else $KILN_STATE, else $XDG_STATE_HOME/kiln,
else ~/.local/state/kiln) holds kiln.db and the API token: it is created on
first start (mode 0600) and printed once. Every route but /v1/health needs
it as "Authorization: Bearer TOKEN". kiln serve listens on 127.0.0.1 unless
told otherwise, and refuses a non-loopback address without a token.

Settings can also come from a TOML file (--config) with the keys listen,
images, state, max_vms, max_memory, pool_max, min_idle, idle_timeout,
max_queued, max_body, result_ttl, shutdown_grace, insecure_no_auth, volumes,
provider, advertise and a [slurm] table; flags win.

--volume HOST:GUEST[:ro|:rw] (repeatable) mounts an operator's host
directory into every VM of the endpoint, read-only unless :rw, as kiln run
does; tasks cannot ask for any other host path. With the Slurm provider the
workers mount the same path on their nodes (a shared filesystem).

With provider = "slurm" the endpoint runs no VMs itself: it submits pilot
jobs (blocks) with sbatch, each runs "kiln worker" on its compute node, and
the number of blocks follows the queue (docs/slurm.md). The pilot job is
checked with sbatch --test-only at start, so a bad partition or account
stops kiln serve with sbatch's own message. Stopping kiln serve cancels its
blocks. provider = "workers" takes workers started by hand.`,
		Example: `  kiln serve --images /shared/images
  kiln serve --config /etc/kiln/serve.toml
  kiln serve --images ./images --max-vms 4 --max-memory 8G --idle-timeout 10m
  kiln serve --images ./images --volume /shared/data:/data --volume /scratch/out:/out:rw
  kiln serve --images /shared/images --listen 10.1.0.5:8470 --provider slurm --partition compute --max-blocks 4`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configPath != "" {
				fc, err := endpoint.LoadFileConfig(configPath)
				if err != nil {
					return err
				}
				mergeServeConfig(cmd, &c, fc)
			}
			cfg, err := c.Config()
			if err != nil {
				return err
			}
			cfg.Log = a.logger()
			if configPath != "" {
				if cfg.ConfigFile, err = filepath.Abs(configPath); err != nil {
					return err
				}
			}
			if cfg.Provider == endpoint.ProviderLocal || cfg.Provider == "" {
				cfg.VM.Log, cfg.VM.Accel = cfg.Log, a.accel()
			}
			if err := endpoint.CheckListen(c.Listen, !cfg.NoAuth); err != nil {
				return err
			}
			if !cfg.NoAuth {
				tok, created, err := endpoint.LoadOrCreateToken(cfg.StateDir)
				if err != nil {
					return err
				}
				cfg.Token = tok
				if created {
					fmt.Fprintf(a.stderr, "kiln: created the API token %s\nkiln: it is stored in %s (mode 0600) and will not be printed again\n",
						tok, filepath.Join(cfg.StateDir, endpoint.TokenFile))
				}
			}
			ln, err := net.Listen("tcp", c.Listen)
			if err != nil {
				return fmt.Errorf("listening on %s (is another kiln serve running? choose --listen): %w", c.Listen, err)
			}
			if cfg.Provider == endpoint.ProviderSlurm {
				exe, err := os.Executable()
				if err != nil {
					ln.Close()
					return fmt.Errorf("finding the kiln binary for the pilot jobs: %w", err)
				}
				u := advertiseURL(c.Advertise, ln.Addr())
				cfg.WorkerCommand = []string{exe, "worker", "--endpoint", u}
				if !cfg.NoAuth {
					cfg.WorkerCommand = append(cfg.WorkerCommand, "--token-file", slurm.TokenFile(cfg.StateDir))
				}
				for _, v := range cfg.VM.Volumes {
					// The same host path on every node: a shared filesystem.
					cfg.WorkerCommand = append(cfg.WorkerCommand, "--volume", v.String())
				}
				if a.verbose {
					cfg.WorkerCommand = append(cfg.WorkerCommand, "-v")
				}
				fmt.Fprintf(a.stderr, "kiln: checking the pilot job with sbatch --test-only (workers will reach this endpoint at %s)\n", u)
			}
			srv, err := endpoint.New(cfg)
			if err != nil {
				ln.Close()
				return err
			}
			eff := srv.Config()
			if eff.Provider == endpoint.ProviderLocal {
				fmt.Fprintf(a.stderr, "kiln: serving on http://%s (images %s, state %s, up to %d VMs and %d MiB)\n",
					ln.Addr(), orNone(eff.ImagesDir), eff.StateDir, eff.MaxVMs, eff.MaxMemoryMiB)
			} else {
				fmt.Fprintf(a.stderr, "kiln: serving on http://%s (images %s, state %s, provider %s: tasks run on workers; kiln workers lists them)\n",
					ln.Addr(), orNone(eff.ImagesDir), eff.StateDir, eff.Provider)
			}
			serr := srv.Serve(cmd.Context(), ln)
			fmt.Fprintln(a.stderr, "kiln: shutting down")
			if err := srv.Close(); err != nil && serr == nil {
				serr = err
			}
			return serr
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "TOML config file (flags override it)")
	f.StringVar(&c.Listen, "listen", endpoint.DefaultListen, "address to listen on")
	f.StringVar(&c.Images, "images", "", "directory of image files that functions may name")
	f.StringVar(&c.State, "state", "", "state directory for the database and token (default $KILN_STATE, else ~/.local/state/kiln)")
	f.IntVar(&c.MaxVMs, "max-vms", 0, "cap on concurrent VMs (default: the number of CPUs)")
	f.StringVar(&c.MaxMemory, "max-memory", "", "cap on the VMs' total memory, e.g. 8G (default: 3/4 of the host's RAM)")
	f.IntVar(&c.PoolMax, "pool-max", 0, "cap on VMs per image (default: --max-vms)")
	f.IntVar(&c.MinIdle, "min-idle", 0, "idle VMs each image keeps after the idle timeout")
	f.StringVar(&c.IdleTimeout, "idle-timeout", endpoint.DefaultIdleTimeout.String(), "stop a VM that has been idle this long")
	f.IntVar(&c.MaxQueued, "max-queued", endpoint.DefaultMaxQueued, "queued tasks before submissions get 429")
	f.StringVar(&c.MaxBody, "max-body", "32M", "largest request body")
	f.StringVar(&c.ResultTTL, "result-ttl", endpoint.DefaultResultTTL.String(), "how long finished tasks and results are kept")
	f.StringVar(&c.ShutdownGrace, "shutdown-grace", "10s", "on shutdown, how long running tasks may finish (the rest run again after a restart)")
	f.BoolVar(&c.InsecureNoAuth, "insecure-no-auth", false, "serve without a token (refused unless listening on loopback)")
	f.StringArrayVar(&c.Volumes, "volume", nil, fmt.Sprintf("mount the host directory HOST at GUEST in every VM, read-only unless :rw (HOST:GUEST[:ro|:rw]; repeatable, up to %d; tasks cannot name other host paths)", proto.VolumeSlots))
	f.StringVar(&c.Provider, "provider", endpoint.ProviderLocal, "where tasks run: local (this machine's VMs), slurm (workers in pilot jobs), workers (workers started by hand)")
	f.StringVar(&c.Advertise, "advertise", "", "URL the workers reach this endpoint at (default: from --listen, with this host's name for 0.0.0.0)")
	f.StringVar(&c.Slurm.Partition, "partition", "", "[slurm] partition of the pilot jobs")
	f.StringVar(&c.Slurm.Account, "account", "", "[slurm] account of the pilot jobs")
	f.StringVar(&c.Slurm.Walltime, "walltime", "", "[slurm] walltime of a pilot job, as sbatch --time takes it (default "+slurm.DefaultWalltime+")")
	f.IntVar(&c.Slurm.MaxBlocks, "max-blocks", 0, "[slurm] the most pilot jobs at once (default 1)")
	f.IntVar(&c.Slurm.CPUsPerTask, "cpus-per-task", 0, "[slurm] CPUs of each worker")
	return cmd
}

// advertiseURL is the URL workers are given: the --advertise value, else
// the listening address, with the host's name for an unspecified one.
func advertiseURL(adv string, addr net.Addr) string {
	if adv != "" {
		return strings.TrimRight(adv, "/")
	}
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return "http://" + addr.String()
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = hostname()
	}
	return "http://" + net.JoinHostPort(host, port)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// mergeServeConfig fills the settings whose flags were not given from fc.
func mergeServeConfig(cmd *cobra.Command, c *endpoint.FileConfig, fc endpoint.FileConfig) {
	ch := cmd.Flags().Changed
	set := func(flag string, apply func()) {
		if !ch(flag) {
			apply()
		}
	}
	set("listen", func() {
		if fc.Listen != "" {
			c.Listen = fc.Listen
		}
	})
	set("images", func() { c.Images = fc.Images })
	set("state", func() { c.State = fc.State })
	set("max-vms", func() { c.MaxVMs = fc.MaxVMs })
	set("max-memory", func() { c.MaxMemory = fc.MaxMemory })
	set("pool-max", func() { c.PoolMax = fc.PoolMax })
	set("min-idle", func() { c.MinIdle = fc.MinIdle })
	set("idle-timeout", func() {
		if fc.IdleTimeout != "" {
			c.IdleTimeout = fc.IdleTimeout
		}
	})
	set("max-queued", func() {
		if fc.MaxQueued != 0 {
			c.MaxQueued = fc.MaxQueued
		}
	})
	set("max-body", func() {
		if fc.MaxBody != "" {
			c.MaxBody = fc.MaxBody
		}
	})
	set("result-ttl", func() {
		if fc.ResultTTL != "" {
			c.ResultTTL = fc.ResultTTL
		}
	})
	set("shutdown-grace", func() {
		if fc.ShutdownGrace != "" {
			c.ShutdownGrace = fc.ShutdownGrace
		}
	})
	set("insecure-no-auth", func() { c.InsecureNoAuth = fc.InsecureNoAuth })
	set("provider", func() {
		if fc.Provider != "" {
			c.Provider = fc.Provider
		}
	})
	set("advertise", func() { c.Advertise = fc.Advertise })
	set("volume", func() { c.Volumes = fc.Volumes })
	// The [slurm] table, with the keys whose flags were given replaced.
	sl := fc.Slurm
	for flag, apply := range map[string]func(){
		"partition":     func() { sl.Partition = c.Slurm.Partition },
		"account":       func() { sl.Account = c.Slurm.Account },
		"walltime":      func() { sl.Walltime = c.Slurm.Walltime },
		"max-blocks":    func() { sl.MaxBlocks = c.Slurm.MaxBlocks },
		"cpus-per-task": func() { sl.CPUsPerTask = c.Slurm.CPUsPerTask },
	} {
		if ch(flag) {
			apply()
		}
	}
	c.Slurm = sl
}
