package main

import (
	"fmt"
	"net"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/endpoint"
	"github.com/kiln-dev/kiln/internal/vm"
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
max_queued, max_body, result_ttl, shutdown_grace, insecure_no_auth; flags win.`,
		Example: `  kiln serve --images /shared/images
  kiln serve --config /etc/kiln/serve.toml
  kiln serve --images ./images --max-vms 4 --max-memory 8G --idle-timeout 10m`,
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
			cfg.VM = vm.Config{Log: cfg.Log, Accel: a.accel()}
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
			srv, err := endpoint.New(cfg)
			if err != nil {
				ln.Close()
				return err
			}
			eff := srv.Config()
			fmt.Fprintf(a.stderr, "kiln: serving on http://%s (images %s, state %s, up to %d VMs and %d MiB)\n",
				ln.Addr(), orNone(eff.ImagesDir), eff.StateDir, eff.MaxVMs, eff.MaxMemoryMiB)
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
	return cmd
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
}
