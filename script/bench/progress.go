package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// progress reports what the benchmark does: on a terminal a live status
// line (elapsed time, run k of n, the current step) under the log lines;
// otherwise one plain line per run and per log message.
type progress struct {
	w     io.Writer
	tty   bool
	start time.Time

	mu          sync.Mutex
	total, done int
	run, detail string
	stop        chan struct{}
	stopped     chan struct{}
}

func newProgress(f *os.File) *progress {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	p := &progress{w: f, tty: err == nil, start: time.Now(), stop: make(chan struct{}), stopped: make(chan struct{})}
	if p.tty {
		go p.loop()
	} else {
		close(p.stopped)
	}
	return p
}

func (p *progress) loop() {
	defer close(p.stopped)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			p.mu.Lock()
			fmt.Fprint(p.w, "\r\033[K")
			p.mu.Unlock()
			return
		case <-t.C:
			p.mu.Lock()
			p.draw()
			p.mu.Unlock()
		}
	}
}

// draw writes the status line; the caller holds mu.
func (p *progress) draw() {
	line := fmt.Sprintf("[%s]", clock(time.Since(p.start)))
	if p.total > 0 {
		line += fmt.Sprintf(" run %d/%d", min(p.done+1, p.total), p.total)
	}
	if p.run != "" {
		line += " " + p.run
	}
	if p.detail != "" {
		line += ": " + p.detail
	}
	fmt.Fprintf(p.w, "\r\033[K%s", line)
}

// logf prints a line that stays.
func (p *progress) logf(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	msg := fmt.Sprintf(format, args...)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K[%s] %s\n", clock(time.Since(p.start)), msg)
		select {
		case <-p.stop:
		default:
			p.draw()
		}
		return
	}
	fmt.Fprintf(p.w, "[%s] %s\n", clock(time.Since(p.start)), msg)
}

// setTotal sets how many runs the plan holds.
func (p *progress) setTotal(n int) {
	p.mu.Lock()
	p.total = n
	p.mu.Unlock()
}

// begin starts a run.
func (p *progress) begin(run string) {
	p.mu.Lock()
	p.run, p.detail = run, ""
	n, total := p.done+1, p.total
	p.mu.Unlock()
	if !p.tty {
		p.logf("run %d/%d %s", n, total, run)
	}
}

// end finishes a run.
func (p *progress) end() {
	p.mu.Lock()
	p.done++
	p.run, p.detail = "", ""
	p.mu.Unlock()
}

// step names what the current run does now (shown on a terminal only).
func (p *progress) step(what string) {
	p.mu.Lock()
	p.detail = what
	p.mu.Unlock()
}

// close removes the status line.
func (p *progress) close() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.stopped
}

func clock(d time.Duration) string {
	s := int(d.Seconds())
	return fmt.Sprintf("%02d:%02d", s/60, s%60)
}
