{
  description = "Virby: a Linux build machine on demand for Nix users on macOS";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";
    # Only for checks that evaluate the module inside a nix-darwin system; optional for users.
    nix-darwin = {
      url = "github:nix-darwin/nix-darwin";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, nix-darwin, ... }:
    let
      inherit (nixpkgs) lib;
      hostSystems = [ "aarch64-darwin" "aarch64-linux" "x86_64-linux" ];
      forAll = f: lib.genAttrs hostSystems (system: f nixpkgs.legacyPackages.${system});
      guest = import ./image/nixos { inherit nixpkgs; };

      # lib.nix cases that must evaluate (or fail) as the unit tests also check.
      libCases = {
        defaults = { };
        rosetta = { rosetta = true; };
        nested = { nestedVirtualization = true; };
        alwaysOn = { onDemand.enable = false; };
        onDemand = { onDemand = { enable = true; ttl = 30; }; };
        sharedDirs = { sharedDirectories.src = "/Users/me/src"; };
        memoryString = { memory = "8GiB"; diskSize = "200GiB"; };
      };
      badCases = { port80 = { port = 80; }; memoryLots = { memory = "lots"; }; };
    in
    {
      darwinModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/module.nix ];
        services.virby.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.virby;
      };

      packages = forAll (pkgs: rec {
        virby = pkgs.callPackage ./nix/package.nix { };
        default = virby;
      } // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "aarch64-linux") {
        # kernel, initrd, store.img and cmdline of the vfkit guest
        guest = guest.bundle;
      });

      checks = forAll (pkgs:
        let
          virbyLib = import ./nix/lib.nix;
          good = lib.mapAttrs (name: opts:
            pkgs.writeText "virby-lib-${name}.json" (builtins.toJSON (virbyLib opts).config))
            libCases;
          bad = lib.mapAttrs (name: opts:
            assert (virbyLib opts).errors != [ ];
            pkgs.writeText "virby-lib-${name}-rejected" (lib.concatStringsSep "\n" (virbyLib opts).errors))
            badCases;
        in
        lib.mapAttrs' (n: v: lib.nameValuePair "lib-${n}" v) good
        // lib.mapAttrs' (n: v: lib.nameValuePair "lib-rejects-${n}" v) bad
        // { package = self.packages.${pkgs.stdenv.hostPlatform.system}.virby; }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isDarwin {
          # Evaluates the module in nix-darwin with `enable = true` alone (a first switch) and
          # writes what it produced, without building the guest (nothing is downloaded).
          module =
            let
              sys = nix-darwin.lib.darwinSystem {
                modules = [
                  self.darwinModules.default
                  {
                    nixpkgs.hostPlatform = pkgs.stdenv.hostPlatform.system;
                    system.stateVersion = 6;
                    services.virby.enable = true;
                  }
                ];
              };
              failed = map (a: a.message) (builtins.filter (a: !a.assertion) sys.config.assertions);
            in
            assert failed == [ ] || throw (lib.concatStringsSep "\n" failed);
            pkgs.writeText "virby-module-eval.json" (builtins.unsafeDiscardStringContext (builtins.toJSON {
              config = sys.config.environment.etc."virby/config.json".text;
              plist = sys.config.environment.launchDaemons."org.nixos.virby.plist".text;
              machines = sys.config.environment.etc."nix/machines".text;
            }));
        });
    };
}
