package integration

import (
	"testing"

	"github.com/lazycas/lazycas/integration/testenv"
	"github.com/lazycas/lazycas/integration/testimages"
)

func TestBusyboxRunsShellCommands(t *testing.T) {
	env := newEnv(t)
	ctx := testContext(t)
	pushed, err := env.PushImage(ctx, testimages.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	img, err := env.Pull(ctx, pushed.Ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		args   []string
		stdout string
		code   uint32
	}{
		{"prints to stdout", []string{"sh", "-c", "echo hi"}, "hi\n", 0},
		{"passes the exit status on", []string{"sh", "-c", "echo bye; exit 3"}, "bye\n", 3},
		{"sees the image's /etc", []string{"sh", "-c", "grep -c root /etc/passwd"}, "1\n", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := env.Run(ctx, img, testenv.UniqueID("busybox"), tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if res.Stdout != tc.stdout || res.ExitCode != tc.code {
				t.Errorf("got stdout %q exit %d (stderr %q), want %q exit %d",
					res.Stdout, res.ExitCode, res.Stderr, tc.stdout, tc.code)
			}
		})
	}
}
