// Command kiln builds Python unikernel images and runs functions in them as microVMs.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
)

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	// The first SIGINT or SIGTERM cancels ctx: every verb then stops its
	// VMs and returns; kiln exits 128+N, as a shell expects of a process
	// the signal ended. Later signals are absorbed while it cleans up.
	var got atomic.Value
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			if got.CompareAndSwap(nil, s) {
				cancel()
			}
		}
	}()
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	if s, ok := got.Load().(syscall.Signal); ok {
		fmt.Fprintln(os.Stderr, "kiln: interrupted")
		os.Exit(128 + int(s))
	}
	if err != nil {
		var ec exitCode
		if errors.As(err, &ec) {
			os.Exit(int(ec))
		}
		fmt.Fprintln(os.Stderr, "kiln:", err)
		os.Exit(1)
	}
}
